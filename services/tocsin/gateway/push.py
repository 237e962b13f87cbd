"""Push registrations: a device's FCM token, beside its record in ``DEVICES`` (CONTRACT §6).

A registration belongs to the device (``sub`` + ``client_id``) and is the last message on
``tocsin.devices.<consumer>.push``: the same stream as the device's record (its replicas,
``TOCSIN_REPLICAS``, so a node loss in an R3 cluster loses no registration), one message
per subject, so a new token replaces the old one (token rotation). Removing it writes a
tombstone (``token`` null) rather than purging, so that a watcher (the notifier keeps a
view of ``DEVICES``) learns it.

It is not part of the record on purpose: the record is written by the session owning the
device, conditional on the record it replaces (ownership.py), and an HTTP registration
from an app in the background must never fence a live session. A registration write is
unconditional (the last registration wins), except the notifier's drop on FCM's 404
``UNREGISTERED``, which is conditional on the registration it tried: a token registered
meanwhile stays.

Sources: ``register_push`` / ``unregister_push`` frames of a session, and
``PUT`` / ``DELETE /api/v1/devices/{client_id}/push`` with the device's own token.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from pydantic import BaseModel, ConfigDict, ValidationError

from tocsin.core.auth import Claims, TokenError, bearer
from tocsin.core.naming import Names
from tocsin.schemas import (
    Error,
    ErrorCode,
    PushRegistered,
    PushRegistration,
    PushUnregistered,
    RegisterPush,
    UnregisterPush,
)

from .records import Conflict, publish_over

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

#: How long one registration write may take.
WRITE_TIMEOUT = 2.0
#: Where the HTTP registration is served (CONTRACT §6).
PUSH_PATH = "/api/v1/devices/{client_id}/push"


class Registration(BaseModel):
    """A stored registration; ``token`` None: removed (a tombstone)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    user: str
    client_id: str
    provider: str = "fcm"
    token: str | None = None
    #: The registering token's regions (None: admin, every region): they bound what is
    #: pushed, as the token bounds what the socket delivers.
    regions: tuple[str, ...] | None = ()
    at: float = 0.0  # unix seconds of the write

    @property
    def active(self) -> bool:
        return self.token is not None

    @classmethod
    def parse(cls, data: bytes) -> Registration | None:
        try:
            return cls.model_validate_json(data or b"{}")
        except ValidationError:
            return None


class PushRegistrations:
    """Reads and writes of registrations; the gateway and the notifier share it."""

    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self._js = js
        self._names = names

    def _subject(self, user: str, client_id: str) -> str:
        return self._names.device_push_subject(self._names.device_consumer(user, client_id))

    async def put(self, claims: Claims, client_id: str, registration: PushRegistration) -> int:
        """Store (or replace) the device's registration; the new message's sequence."""
        body = Registration(
            user=claims.sub,
            client_id=client_id,
            provider=registration.provider,
            token=registration.token,
            regions=claims.receivable_regions(),
            at=time.time(),
        )
        ack = await self._js.publish(
            self._subject(claims.sub, client_id),
            orjson.dumps(body.model_dump(mode="json")),
            timeout=WRITE_TIMEOUT,
        )
        return ack.seq

    async def remove(self, user: str, client_id: str, expected: int | None = None) -> bool:
        """Write the tombstone; with ``expected``, only over that registration (False: it
        was replaced meanwhile, and stays)."""
        body = Registration(user=user, client_id=client_id, token=None, at=time.time())
        subject, data = self._subject(user, client_id), orjson.dumps(body.model_dump(mode="json"))
        if expected is None:
            await self._js.publish(subject, data, timeout=WRITE_TIMEOUT)
            return True
        try:
            await publish_over(self._js, subject, data, expected, WRITE_TIMEOUT, client_id)
        except Conflict:
            return False
        return True

    async def read(self, user: str, client_id: str) -> tuple[int, Registration | None]:
        """The registration's sequence and body (None: none, or removed)."""
        try:
            msg = await self._js.get_last_msg(
                self._names.devices_stream, self._subject(user, client_id)
            )
        except NotFoundError:
            return 0, None
        found = Registration.parse(msg.data or b"")
        return msg.seq or 0, found if found is not None and found.active else None


# ---------------------------------------------------------------- the session's frames


async def on_frame(session: Session, frame: RegisterPush | UnregisterPush) -> None:
    """``register_push`` / ``unregister_push`` on a connection: stored, then answered."""
    registrations = PushRegistrations(session.gw.js, session.gw.names)
    device = session.device
    try:
        if isinstance(frame, RegisterPush):
            await registrations.put(device.claims, device.client_id, frame.registration)
            answer: Any = PushRegistered(provider=frame.provider, client_id=device.client_id)
        else:
            await registrations.remove(device.user_id, device.client_id)
            answer = PushUnregistered(client_id=device.client_id)
    except (TimeoutError, NatsError) as exc:
        log.warning("%s: push registration not stored: %s", session.consumer, exc)
        answer = Error(
            code=ErrorCode.INTERNAL, detail="push registration not stored; send it again later"
        )
    session.send_control(answer)


# ---------------------------------------------------------------- HTTP


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


async def _device(request: web.Request) -> tuple[Claims, str] | web.Response:
    from .handler import CLIENT_ID_RE, GATEWAY

    gw = request.app[GATEWAY]
    token = bearer(request.headers.get("Authorization")) or request.query.get("auth_token")
    try:
        claims = await gw.verifier.averify(token)
    except TokenError as exc:
        return _error(401, exc.error, exc.detail)
    if not claims.is_admin and not claims.regions:
        return _error(403, "no_regions", "the token's regions claim grants no region")
    client_id = request.match_info["client_id"]
    if not CLIENT_ID_RE.fullmatch(client_id):
        return _error(
            400, "invalid_parameter", "client_id: 1-64 characters of A-Z a-z 0-9 . _ : @ -"
        )
    return claims, client_id


async def put_push(request: web.Request) -> web.Response:
    """``PUT /api/v1/devices/{client_id}/push`` ``{"provider": "fcm", "token": "..."}``."""
    from .handler import GATEWAY

    device = await _device(request)
    if isinstance(device, web.Response):
        return device
    claims, client_id = device
    try:
        body = PushRegistration.model_validate_json(await request.read())
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]) or "body", "message": e["msg"]}
            for e in exc.errors()
        ]
        first = errors[0]
        return web.json_response(
            {
                "error": "invalid_body",
                "detail": f"{first['field']}: {first['message']}",
                "errors": errors,
            },
            status=422,
        )
    gw = request.app[GATEWAY]
    try:
        await PushRegistrations(gw.js, gw.names).put(claims, client_id, body)
    except (TimeoutError, NatsError) as exc:
        log.warning("push registration of %s/%s not stored: %s", claims.sub, client_id, exc)
        return _error(503, "backend_unavailable", "the registration was not stored; retry")
    return web.json_response(
        PushRegistered(provider=body.provider, client_id=client_id).model_dump(mode="json")
    )


async def delete_push(request: web.Request) -> web.Response:
    """``DELETE /api/v1/devices/{client_id}/push``: the device gets no more pushes."""
    from .handler import GATEWAY

    device = await _device(request)
    if isinstance(device, web.Response):
        return device
    claims, client_id = device
    gw = request.app[GATEWAY]
    try:
        await PushRegistrations(gw.js, gw.names).remove(claims.sub, client_id)
    except (TimeoutError, NatsError) as exc:
        log.warning("push registration of %s/%s not removed: %s", claims.sub, client_id, exc)
        return _error(503, "backend_unavailable", "the registration was not removed; retry")
    return web.json_response(PushUnregistered(client_id=client_id).model_dump(mode="json"))


def setup(app: web.Application) -> None:
    app.router.add_put(PUSH_PATH, put_push)
    app.router.add_delete(PUSH_PATH, delete_push)
