"""The exceptions of the client: one type per thing the application must act on."""

from __future__ import annotations

from typing import Any


class TocsinError(Exception):
    """Base of every error this package raises."""


class HandshakeRefused(TocsinError):
    """The gateway refused the WebSocket handshake with an HTTP status and a JSON body
    ``{"error": ..., "detail": ...}`` (docs/protocol.md §1, "Handshake refusals")."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: float | None = None):
        self.status = status
        self.body = body
        self.error = str(body.get("error", ""))
        self.detail = str(body.get("detail", ""))
        self.retry_after = retry_after
        Exception.__init__(
            self, f"HTTP {status} {self.error or '(no body)'}: {self.detail}".rstrip(": ")
        )


class AuthError(HandshakeRefused):
    """The token was refused (401, or 403 ``no_regions`` / ``origin_not_allowed``), also
    after the token provider was asked for a fresh one; or the token expired (4401) and
    there is no provider. The client does not reconnect."""


class LimitError(HandshakeRefused):
    """429 ``banned`` / ``too_many_connections`` or 503 whose ``Retry-After`` is longer
    than the client's ``max_retry_after``: the client gives up instead of waiting."""


class ProtocolError(TocsinError):
    """The server said the client spoke the protocol wrong: a 400 ``invalid_parameter``
    handshake, or an ``error`` frame answering a request. ``code`` is the protocol's code
    (``invalid_parameter``, ``invalid_frame``, ...), ``detail`` names the field."""

    def __init__(self, code: str, detail: str, frame: dict[str, Any] | None = None) -> None:
        self.code = code
        self.detail = detail
        self.frame = frame
        Exception.__init__(self, f"{code}: {detail}")


class InvalidParameter(ProtocolError, HandshakeRefused):
    """400 ``invalid_parameter`` at the handshake (bad ``client_id`` or filter)."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        HandshakeRefused.__init__(self, status, body)
        ProtocolError.__init__(self, self.error or "invalid_parameter", self.detail)


class SubscriptionRefused(ProtocolError):
    """A ``subscription_response`` whose ``status`` is not ``ok`` (``denied`` or
    ``invalid``); nothing changed on the server. ``response`` is the whole frame."""

    def __init__(self, response: dict[str, Any]) -> None:
        self.response = response
        self.status = str(response.get("status"))
        super().__init__(self.status, str(response.get("detail", "")), response)


class Replaced(TocsinError):
    """Close code 4009: another connection of the same device (token ``sub`` +
    ``client_id``) took over. Never retried: two installations sharing a ``client_id``
    would evict each other forever."""

    def __init__(self, reason: str = "") -> None:
        self.reason = reason
        super().__init__(f"4009 replaced by another connection of this device {reason}".strip())


class Unreachable(TocsinError):
    """``max_failed_attempts`` connection attempts in a row reached no gateway (refused,
    timed out, DNS): raised only when the application set that limit."""

    def __init__(self, url: str, attempts: int, reason: str) -> None:
        self.url = url
        self.attempts = attempts
        self.reason = reason
        super().__init__(f"cannot connect to {url} ({attempts} attempts): {reason}")


class ClientClosed(TocsinError):
    """The client was closed (``close()``) while a request waited for its answer."""
