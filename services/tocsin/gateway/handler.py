"""The WebSocket endpoint: handshake checks, then one :class:`Session` per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import WSMsgType, web
from nats.errors import Error as NatsError
from pydantic import ValidationError

from tocsin.core.auth import TokenError, bearer
from tocsin.core.logs import log_context
from tocsin.schemas import (
    MAX_CLIENT_FRAME_BYTES,
    Ack,
    BacklogTruncated,
    Close,
    ConnectionEstablished,
    Error,
    ErrorCode,
    GetStats,
    Pong,
    RateLimitWarning,
    RegisterPush,
    Subscribe,
    UnregisterPush,
    Unsubscribe,
    UpdateFilters,
    client_frame_adapter,
)
from tocsin.schemas.subscription import FILTER_KEYS, FilterError, Filters

from . import push
from .context import Gateway
from .device import Device, Record
from .guard import Refused
from .ownership import Busy, State, Superseded
from .queue import Opened, QueueError
from .session import Session
from .subscriptions import decide, response

log = logging.getLogger(__name__)
#: Security events (refusals, bans, rate limits): one line each, for an audit trail.
audit_log = logging.getLogger("tocsin.audit")

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)
#: Where the WebSocket is served (CONTRACT §6).
WS_PATH = "/api/v1/alerts/ws"
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
#: Frames above this are refused by aiohttp itself (close 1009); up to it, an error frame.
HARD_FRAME_LIMIT = 1024 * 1024


def json_error(status: int, error: str, detail: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


async def parse_device(request: web.Request, gw: Gateway) -> Device | web.Response:
    token = request.query.get("auth_token") or bearer(request.headers.get("Authorization"))
    try:
        claims = await gw.verifier.averify(token)
    except TokenError as exc:
        audit(exc.error, request)
        return json_error(401, exc.error, exc.detail)
    if not claims.is_admin and not claims.regions:
        return json_error(403, "no_regions", "the token's regions claim grants no region")
    client_id = request.query.get("client_id", "default")
    if not CLIENT_ID_RE.fullmatch(client_id):
        return json_error(
            400, "invalid_parameter", "client_id: 1-64 characters of A-Z a-z 0-9 . _ : @ -"
        )
    ack_mode = request.query.get("ack_mode", "client")
    if ack_mode not in ("client", "auto"):
        return json_error(400, "invalid_parameter", "ack_mode: must be 'client' or 'auto'")
    compression = request.query.get("compression", "none")
    if compression not in ("deflate", "none"):
        return json_error(400, "invalid_parameter", "compression: must be 'deflate' or 'none'")
    filters = None  # none given: the device keeps the filters it has
    if any(request.query.get(key, "").strip() for key in FILTER_KEYS):
        try:
            filters = Filters.from_query(request.query)
        except FilterError as exc:
            return json_error(400, "invalid_parameter", str(exc))
    return Device(claims, client_id, ack_mode, filters, compression == "deflate")  # type: ignore[arg-type]


async def websocket(request: web.Request) -> web.StreamResponse:
    arrived = time.monotonic()
    gw = request.app[GATEWAY]
    if gw.shutting_down:
        return json_error(
            503, "shutting_down", "this gateway is stopping; reconnect", **{"Retry-After": "1"}
        )
    refused = origin_refused(request, gw.settings.allowed_origins)
    if refused is not None:
        audit("origin_refused", request, origin=request.headers.get("Origin"))
        return refused
    device = await parse_device(request, gw)
    if isinstance(device, web.Response):
        return device
    holder = uuid.uuid4().hex
    slot: str | None = None
    try:
        slot = await gw.guard.admit(device.user_id, device.client_id, holder)
    except Refused as exc:
        audit(exc.error, request, sub=device.user_id, client_id=device.client_id)
        retry = str(max(1, math.ceil(exc.retry_after)))
        return json_error(429, exc.error, exc.detail, **{"Retry-After": retry})
    except (NatsError, TimeoutError) as exc:
        # Without NATS the device cannot be served either: serve() closes with 4503 (its
        # position untouched), as it did before there were slots.
        log.warning("connection slot of %s not taken: %s", device.user_id, exc)
    try:
        mode = gw.settings.ws_compression  # the client must also offer it in the handshake
        compress = mode == "on" or (mode == "client" and device.compression)
        # autoping off: receive() answers the client's WebSocket pings and sees its pongs.
        ws = web.WebSocketResponse(max_msg_size=HARD_FRAME_LIMIT, autoping=False, compress=compress)
        await ws.prepare(request)
        bound_send_buffer(request.transport, gw.settings.ws_send_buffer_kib)
        session = Session(gw, ws, device, request.transport)
        # Every line logged for this connection, by it or the tasks it starts, names it.
        with log_context(connection_id=session.id, device=f"{device.user_id}/{device.client_id}"):
            try:
                await serve(gw, session, arrived)
            except Exception:  # serve() closed the socket with 1011 or 4503
                log.exception("session %s failed", session.id)
    finally:
        if slot is not None:
            await gw.guard.release(slot, holder)
    return ws


def origin_refused(request: web.Request, allowed: list[str]) -> web.Response | None:
    """A browser handshake (it has ``Origin``) from an origin not allowed: 403. Without
    ``TOCSIN_ALLOWED_ORIGINS``, only the gateway's own origin (the ``Host`` it was asked
    for) is; non-browser clients send no ``Origin`` and are not concerned."""
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed:
        return None
    origin = origin.lower().rstrip("/")
    if allowed:
        ok = origin in allowed
    else:
        parts = urlsplit(origin)
        ok = parts.scheme in ("http", "https") and parts.netloc == request.host.lower()
    if ok:
        return None
    return json_error(403, "origin_not_allowed", f"origin {origin!r} may not open this WebSocket")


def audit(event: str, request: web.Request, **fields: object) -> None:
    """One structured line per security event; never a token (query strings are not
    logged: auth_token may be in them)."""
    peer = request.remote or "-"
    audit_log.warning("%s from %s", event, peer, extra={"event": event, "peer": peer, **fields})


def bound_send_buffer(transport: asyncio.BaseTransport | None, kib: int) -> None:
    """Give the socket a fixed send buffer (``TOCSIN_WS_SEND_BUFFER_KIB``): what a client
    that stops reading can hold in the kernel, after the in-flight window and aiohttp's 64
    KiB. Past it the sender blocks, and two heartbeats later the session is closed (4008)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if kib and sock is not None:
        with contextlib.suppress(OSError):  # the peer may be gone already
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, kib * 1024)


async def serve(gw: Gateway, session: Session, arrived: float | None = None) -> None:
    """Claim the device, open its queue, run the session until it ends, then save its
    position, let the device go and close the socket, in that order: a newer connection of
    the device waits for the release, never for the socket (docs/architecture.md §9)."""
    device = session.device
    opened: Opened | None = None
    tasks: list[asyncio.Future[Any]] = []
    gw.owners.register(session)  # from here the takeover responder can find it
    try:
        if not gw.nc.is_connected:
            raise NatsError("not connected to NATS")  # fail fast: the claim needs JetStream
        async with gw.owners.opening:  # a bounded number at once (reconnect storms)
            transport = session.transport
            if transport is not None and transport.is_closing():
                return  # the client gave up while it waited its turn: nothing to claim
            claim = session.claim = await gw.owners.acquire(
                session, device.user_id, device.client_id
            )
            gw.feed.register(session)  # before the queue is opened: live alerts buffer
            # Every alert after this seq is offered to the session from here on (the feed is
            # in order): a new device's queue starts right after it (queue.py open).
            live_from = gw.feed.last_seq if gw.feed.running else None
            found = claim.found
            journaled = None
            if found is not None and found.owner is not None and found.gateway is not None:
                # Its owner did not let go (its gateway was killed or lost NATS): what the
                # device acked since its queue last heard is in that gateway's journal.
                journaled = await gw.journal.read(found.gateway, session.consumer)
            opened = await gw.queues.open(
                device.user_id,
                device.client_id,
                device.claims.receivable_regions(),
                device.filters,
                found,
                journaled,
                live_from,
            )
        session.resume(opened.position, opened.subscription)
        if session.closing:  # asked to leave while opening: let go at once
            return
        claim.check()  # suspended while opening (NATS lost): reconnect
        session.send_control(
            ConnectionEstablished(
                connection_id=session.id,
                user_id=device.user_id,
                client_id=device.client_id,
                ack_mode=device.ack_mode,
                heartbeat_interval=gw.settings.heartbeat_seconds,
                pending=opened.pending,
                regions=list(device.claims.receivable_regions() or []),
                **opened.subscription.as_dict(),
            )
        )
        if opened.dropped:
            session.send_control(BacklogTruncated(dropped=opened.dropped))
        session.established()
        if arrived is not None:
            gw.sessions.timings.handshake.observe(session.established_at - arrived)
        gw.sessions.add(session)  # from now on the ticker pings, redelivers, checkpoints
        # The catch-up task reads the backlog, then ends (the session starts it again when
        # it falls behind); the sender runs only while frames wait for the socket
        # (Session._wake_sender); the receive loop runs in this task. A failure of either
        # task stops the session (Session.task_done) and is raised here.
        session.start_catchup(opened.pending)
        found = claim.found
        if opened.created or found is None or found.subscription != opened.subscription:
            await session.record()  # its position (a new device) or its new filters
        await receive(session)
        if session.failed is not None:
            raise session.failed
    except Superseded:
        session.close(Close.REPLACED, "another connection of this device took over")
    except Busy:
        session.close(
            Close.BACKEND_UNAVAILABLE,
            "another connection of this device does not let go; reconnect later",
        )
    except Exception as exc:
        if session.closing is None:
            backend = isinstance(exc, (NatsError, QueueError, asyncio.TimeoutError))
            session.closing = (
                (Close.BACKEND_UNAVAILABLE, "alert store unavailable; reconnect later")
                if backend
                else (Close.INTERNAL_ERROR, "internal error")
            )
        raise
    finally:
        gw.feed.unregister(session)
        session.stopped.set()  # no sender starts from here on
        tasks.extend(t for t in (session.catchup_task, session.sender_task) if t is not None)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=gw.settings.shutdown_grace_seconds)
            if stuck:
                log.error("session %s: %d tasks ignored cancellation", session.id, len(stuck))
        try:
            if session.claim is not None:
                await _leave(gw, session, opened is not None)
        finally:
            session.finished.set()  # the takeover responder answers "released" now
            gw.owners.unregister(session)
            gw.sessions.discard(session)
            gw.collector.session_closed()
            await session.shut()


async def _leave(gw: Gateway, session: Session, opened: bool) -> None:
    """Save the device's position and let it go: the acked floor goes to the queue, then the
    record (floor, highest seq sent, subscription) is written without owner."""
    claim = session.claim
    assert claim is not None
    if opened and claim.state is State.SUSPENDED:
        # Ended while NATS was away: its position (the highest seq sent above all, which
        # tells the next connection what is a repeat) exists only here. Close the socket,
        # wait for the reconnect's reclaim (bounded), then save and let go as usual.
        await session.shut()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(gw.settings.takeover_seconds):
                await claim.settled.wait()
    # Saved already: JetStream confirmed the queue at the floor, and nothing moved it since
    # (no read, no ack, no NATS outage).
    saved = (
        opened
        and not claim.was_suspended
        and session.queue_at_floor
        and session.window.floor == session.saved_floor
    )
    async with gw.owners.releasing:  # a bounded number at once (SIGTERM ends them all)
        if opened and claim.owning and not saved:
            try:
                await session.checkpoint()
            except Exception as exc:
                log.warning("could not save the position of %s: %s", session.consumer, exc)
        device = session.device
        record = (
            session.current_record()
            if opened
            else claim.found or Record.new(device.user_id, device.client_id)
        )
        try:
            await gw.owners.release(claim, record)
        except Exception as exc:
            log.warning("could not release %s: %s", session.consumer, exc)


#: What ends the receive loop (``async for`` over a WebSocketResponse ends on the same).
_ENDS = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


async def receive(session: Session) -> None:
    """The client's frames, in order, read in the handler's own task (not a task of its own
    per connection; and in one coroutine, one frame fewer to resume per frame read) until
    the client closes or the session is stopped (``Session.close``, or a failure of its
    catch-up or sender task): then the loop is cancelled where it waits, as a receiver
    task was. An error of the loop ends the session like its end does (logged).

    An ack (nearly every frame a client sends) is applied here without a coroutine of its
    own, and without awaiting anything unless JetStream is to hear of it (in catchup);
    aiohttp's ``receive()`` returns at once while frames are buffered, so the acks of one
    read are applied in one wake of this task."""
    task = asyncio.current_task()
    assert task is not None
    receiving = interrupted = False

    def interrupt(_: object) -> None:
        nonlocal interrupted
        if receiving and not interrupted:
            interrupted = True
            task.cancel()

    stopped = session.stopped.future()  # set with the event; no task waits on it
    stopped.add_done_callback(interrupt)
    receiving = True
    ws = session.ws
    receive = ws.receive
    match_ack = ACK_FRAME.fullmatch
    try:
        while True:
            msg = await receive()
            kind = msg.type
            session.last_heard = time.monotonic()
            if kind is WSMsgType.TEXT:
                if (ack := match_ack(msg.data)) is not None:
                    held = session.ack(int(ack[1]))
                    if held is not None:
                        await session.ack_queue(held)
                else:
                    await on_text(session, msg.data)
            elif kind in _ENDS:
                break
            elif kind is WSMsgType.PONG:  # the answer to the ticker's WebSocket ping: heard
                session.ws_pongs += 1
            elif kind is WSMsgType.PING:
                if not await over_limit(session):
                    await session.ws.pong(msg.data)
            elif kind is WSMsgType.BINARY:
                if not await over_limit(session):
                    session.send_control(
                        Error(code=ErrorCode.BINARY_NOT_SUPPORTED, detail="frames are JSON text")
                    )
    except asyncio.CancelledError:
        if not interrupted or task.uncancel() > 0:
            raise  # cancelled from outside (the server stopping): not ours to swallow
    except Exception:
        log.exception("session %s: receive loop failed", session.id)
    finally:
        receiving = False
        stopped.remove_done_callback(interrupt)


def _frame_error(exc: ValidationError) -> Error:
    err = exc.errors()[0]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return Error(
            code=ErrorCode.UNKNOWN_TYPE,
            detail="type: expected one of subscribe, unsubscribe, update_filters, "
            "pong, get_stats, ack",
        )
    fields = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or 'frame'}: {e['msg']}" for e in exc.errors()
    )
    return Error(code=ErrorCode.INVALID_FRAME, detail=fields)


#: The frame a client sends most, in the compact form every JSON encoder writes: taken
#: without the general parse (orjson + the frame union: ~10 µs an ack). Anything else,
#: spaces included, goes the general way and gets the same answer.
ACK_FRAME = re.compile(r'\{"type":"ack","seq":([1-9][0-9]{0,17})\}')


async def over_limit(session: Session) -> bool:
    """Count a client frame against the connection's rate limit (CONTRACT §6): True if it
    is over and must be dropped. The first drop after a while is answered with a
    ``rate_limit_warning``; ``TOCSIN_BAN_AFTER_WARNINGS`` of them within a minute ban the
    user on every instance (gateway/guard.py)."""
    taken, retry_after = session.limit.admit(time.monotonic())
    if taken:
        return False
    if session.limit.flooding and session.closing is None:
        user = session.device.user_id
        audit_log.warning(
            "flood from %s: connection closed",
            user,
            extra={"event": "flood_closed", "sub": user, "dropped": session.limit.dropped},
        )
        session.close(
            Close.POLICY_VIOLATION, "flooding: frames over the rate limit after a warning"
        )
        return True
    if retry_after is not None:
        gw = session.gw
        session.rate_limit_warnings += 1
        session.send_control(
            RateLimitWarning(limit=gw.settings.max_messages_per_minute, retry_after_s=retry_after)
        )
        user = session.device.user_id
        audit_log.warning(
            "rate_limit_warning to %s",
            user,
            extra={"event": "rate_limit_warning", "sub": user, "dropped": session.limit.dropped},
        )
        try:  # a ban is logged by every gateway's watcher (guard.py), this one's too
            await gw.guard.warned(user)
        except Exception as exc:  # NATS away: no ban now; the warnings go on counting
            log.warning("could not ban %s: %s", user, exc)
    return True


async def on_text(session: Session, text: str) -> None:
    """One text frame. Every frame but a well-formed ``ack`` or ``pong`` counts against the
    rate limit, malformed ones included (a flood of garbage spends its sender's budget)."""
    if (ack := ACK_FRAME.fullmatch(text)) is not None:
        await session.on_ack(int(ack[1]))
        return
    frame, error = parse_frame(text)
    if isinstance(frame, Ack | Pong):
        if isinstance(frame, Ack):
            await session.on_ack(frame.seq)
        else:
            session.on_pong(frame.ts)
        return
    if await over_limit(session):
        return
    if error is not None:
        session.send_control(error)
        return
    match frame:
        case GetStats():
            session.send_control(session.stats())
        case Subscribe() | Unsubscribe() | UpdateFilters():
            await on_subscription(session, frame)
        case RegisterPush() | UnregisterPush():
            await push.on_frame(session, frame)


def parse_frame(text: str) -> tuple[Any, Error | None]:
    """A client frame, or the error frame that answers it."""
    if len(text) > MAX_CLIENT_FRAME_BYTES // 4 and len(text.encode()) > MAX_CLIENT_FRAME_BYTES:
        detail = f"frames are limited to 64 KiB ({MAX_CLIENT_FRAME_BYTES} bytes)"
        return None, Error(code=ErrorCode.FRAME_TOO_LARGE, detail=detail)
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return None, Error(code=ErrorCode.INVALID_JSON, detail=f"not JSON: {exc}")
    if not isinstance(data, dict):
        return None, Error(code=ErrorCode.INVALID_FRAME, detail="frame: expected a JSON object")
    try:
        # strict: a field's JSON type must be the schema's ("seq": "5" is an error, CONTRACT §6)
        return client_frame_adapter.validate_python(data, strict=True), None
    except ValidationError as exc:
        return None, _frame_error(exc)


async def on_subscription(session: Session, frame: Subscribe | Unsubscribe | UpdateFilters) -> None:
    decision = decide(session.subscription, frame, session.claims_regions)
    changed = decision.subscription != session.subscription
    if changed:
        try:
            await session.resubscribe(decision.subscription)
        except (TimeoutError, NatsError, QueueError) as exc:
            # Not applied, not stored: the client learns its subscription on reconnecting.
            log.warning("%s: subscription change failed: %s", session.consumer, exc)
            session.close(Close.BACKEND_UNAVAILABLE, "alert store unavailable; reconnect later")
            return
    # The answer goes out before anything is awaited: every alert after it was judged by
    # the subscription it reports, every alert before it by the one before.
    session.send_control(response(frame, decision))
    if changed:
        await session.record()
