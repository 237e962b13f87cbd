"""FCM HTTP v1: the ``messages:send`` body of an alert, the OAuth2 bearer, one request.

* :func:`message`: the body (``notification``, ``data`` as strings, ``android`` and
  ``apns`` delivery options: priority, collapse key, time to live from ``expiry_time``).
  The collapse keys (``android.collapse_key``, ``android.notification.tag``,
  ``apns-collapse-id``) are the alert's: a second notification of one alert replaces the
  first on the phone rather than showing beside it. An update or cancel takes the key of
  the first alert it references, so its notification replaces the one it supersedes; the
  ``data`` then carry ``msg_type`` and ``references`` too.
* :class:`Bearer`: google-auth's service-account credentials (the file's ``token_uri``
  mints the token). google-auth refreshes synchronously (``requests``); the refresh runs
  in a worker thread (``asyncio.to_thread``), once an hour or so, under a lock, so the event
  loop never blocks on it and concurrent pushes wait for one refresh. google-auth's own
  aiohttp transport is marked experimental and private (``google.auth.transport.
  _aiohttp_requests``): not relied on.
* :class:`Sender`: one aiohttp session, its connection pool kept alive between requests
  (HTTP/1.1 keep-alive; FCM also speaks HTTP/2, aiohttp does not), at most
  ``TOCSIN_PUSH_CONCURRENCY`` connections; each answer mapped to an :class:`Outcome`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson

from tocsin.schemas import Alert, AlertLevel

log = logging.getLogger(__name__)

#: The OAuth2 scope of FCM HTTP v1.
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
#: A token is refreshed this long before it expires (google-auth's own threshold is 3m45s).
REFRESH_MARGIN_SECONDS = 300.0
#: ``apns-collapse-id`` may hold at most 64 bytes.
APNS_COLLAPSE_MAX = 64
#: Notification text is cut to this (FCM allows 4 KB for the whole payload).
BODY_MAX = 1000


def collapse_id(alert_id: int | str) -> str:
    text = f"alert-{alert_id}"
    if len(text.encode()) <= APNS_COLLAPSE_MAX:
        return text
    return "alert-" + hashlib.sha256(str(alert_id).encode()).hexdigest()[:56]


def _urgent(level: str) -> bool:
    return AlertLevel(level).rank >= AlertLevel.HIGH.rank


def message(alert: Alert, seq: int, token: str, now: float | None = None) -> dict[str, Any]:
    """The FCM HTTP v1 ``messages:send`` body pushing ``alert`` (stream ``seq``) to ``token``."""
    now = time.time() if now is None else now
    data: dict[str, str] = {
        "alert_id": str(alert.alert_id),
        "seq": str(seq),
        "level": str(alert.alert_level),
        "alert_type": str(alert.alert_type),
        "priority": str(alert.priority),
        "region": alert.location.region,
    }
    if alert.action_url is not None:
        data["action_url"] = str(alert.action_url)
    if alert.created_at is not None:
        data["created_at"] = alert.created_at.isoformat().replace("+00:00", "Z")
    if alert.references:  # an update or cancel: its notification replaces the original's
        data["msg_type"] = str(alert.msg_type)
        data["references"] = ",".join(str(r) for r in alert.references)
    key = collapse_id(alert.references[0] if alert.references else alert.alert_id)
    urgent = _urgent(str(alert.alert_level))
    android: dict[str, Any] = {
        "priority": "high" if urgent else "normal",
        "collapse_key": key,
        "notification": {"tag": key},
    }
    apns_headers = {"apns-priority": "10" if urgent else "5", "apns-collapse-id": key}
    if alert.expiry_time is not None:
        expires = alert.expiry_time.timestamp()
        data["expiry_time"] = alert.expiry_time.isoformat().replace("+00:00", "Z")
        android["ttl"] = f"{max(0, int(expires - now))}s"
        apns_headers["apns-expiration"] = str(int(expires))
    return {
        "message": {
            "token": token,
            "notification": {"title": alert.title, "body": alert.message[:BODY_MAX]},
            "data": data,
            "android": android,
            "apns": {"headers": apns_headers},
        }
    }


class Bearer:
    """The ``Authorization`` of each push: a service account's OAuth2 token, minted from its
    file's ``token_uri`` and refreshed ``margin`` seconds before it expires."""

    def __init__(self, credentials_file: Path, margin: float = REFRESH_MARGIN_SECONDS) -> None:
        from google.oauth2 import service_account

        # Any: google-auth is typed in some releases and not in others (>=2.40 admits both)
        load: Any = service_account.Credentials.from_service_account_file
        self._credentials: Any = load(str(credentials_file), scopes=[FCM_SCOPE])
        self._margin = margin
        self._lock = asyncio.Lock()
        self.refreshes = 0  # tokens minted (tests, /metrics)

    def _fresh(self) -> bool:
        c = self._credentials
        if c.token is None or c.expiry is None:
            return False
        # google-auth keeps expiry as a naive UTC datetime
        left = c.expiry - dt.datetime.now(dt.UTC).replace(tzinfo=None)
        return bool(left.total_seconds() > self._margin)

    def _refresh(self) -> None:
        import google.auth.transport.requests

        request: Any = google.auth.transport.requests.Request  # see __init__
        self._credentials.refresh(request())

    async def header(self, force: bool = False) -> str:
        if force or not self._fresh():
            async with self._lock:
                if force or not self._fresh():
                    await asyncio.to_thread(self._refresh)
                    self.refreshes += 1
                    force = False
        return f"Bearer {self._credentials.token}"


Kind = Literal["sent", "retry", "rejected", "unregistered"]


@dataclass(frozen=True)
class Outcome:
    kind: Kind
    reason: str  # "ok", "http_429", "http_503", "timeout", "unregistered", "http_400", ...
    detail: str = ""
    retry_after: float | None = None  # seconds, from Retry-After


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds of a ``Retry-After`` header: a number, or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _fcm_error_code(body: bytes) -> str | None:
    """``errorCode`` of FCM's error ``details`` (``UNREGISTERED``, ``INVALID_ARGUMENT``...)."""
    try:
        error = orjson.loads(body).get("error", {})
        for detail in error.get("details", []):
            if isinstance(detail, dict) and "errorCode" in detail:
                return str(detail["errorCode"])
        return str(error.get("status")) if error.get("status") else None
    except (orjson.JSONDecodeError, AttributeError):
        return None


def classify(status: int, body: bytes, headers: Any) -> Outcome:
    """What one answer of the push endpoint means for the push."""
    if 200 <= status < 300:
        return Outcome("sent", "ok")
    code = _fcm_error_code(body)
    detail = body[:300].decode("utf-8", "replace")
    if status == 429 or status >= 500:
        return Outcome("retry", f"http_{status}", detail, retry_after(headers.get("Retry-After")))
    if status == 404 and code in ("UNREGISTERED", "NOT_FOUND"):
        return Outcome("unregistered", "unregistered", detail)
    if status == 401:  # our bearer: refreshed, and the push tried again
        return Outcome("retry", "http_401", detail)
    return Outcome("rejected", f"http_{status}", detail)


class Sender:
    """POSTs bodies to the push endpoint over one kept-alive connection pool."""

    def __init__(
        self, url: str, bearer: Bearer | None, concurrency: int, timeout_seconds: float
    ) -> None:
        self.url = url
        self.bearer = bearer
        self._concurrency = concurrency
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._concurrency, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, body: dict[str, Any], force_refresh: bool = False) -> Outcome:
        assert self._session is not None, "Sender.start() first"
        headers = {"Content-Type": "application/json; charset=UTF-8"}
        try:
            if self.bearer is not None:
                headers["Authorization"] = await self.bearer.header(force_refresh)
            async with self._session.post(
                self.url, data=orjson.dumps(body), headers=headers
            ) as resp:
                raw = await resp.read()
                return classify(resp.status, raw, resp.headers)
        except TimeoutError:
            return Outcome("retry", "timeout", "no answer in time")
        except aiohttp.ClientError as exc:
            return Outcome("retry", "connection", str(exc) or type(exc).__name__)
        except Exception as exc:  # google-auth: the token endpoint failed
            if type(exc).__module__.startswith("google."):
                return Outcome("retry", "auth", str(exc)[:300])
            raise
