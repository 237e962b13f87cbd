"""The client: one device's connection to a tocsin gateway, kept up for as long as it runs.

One background task connects, reads and reconnects (docs/protocol.md §3, §7); the
application reads what it received from one iterator, :meth:`TocsinClient.alerts` (alerts
only) or :meth:`TocsinClient.frames` (every frame). An alert counts as handled when the
application asks for the next one (or calls :meth:`TocsinClient.ack`): only then is its id
added to the :class:`~tocsin_client.seen.SeenStore` and its ``seq`` acked, coalesced with
the alerts around it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import aiohttp

from .backoff import Backoff
from .errors import (
    AuthError,
    ClientClosed,
    InvalidParameter,
    LimitError,
    ProtocolError,
    Replaced,
    SubscriptionRefused,
    Unreachable,
)
from .seen import DEFAULT_KEEP_SECONDS, MemorySeenStore, SeenStore

log = logging.getLogger("tocsin_client")

Frame = dict[str, Any]
#: A token, or a callable that returns a fresh one (sync or async): it is called before
#: the first connection, before ``exp`` (``refresh_before`` seconds ahead) and when the
#: gateway says the token expired.
TokenSource = str | Callable[[], str | Awaitable[str]]
State = Literal["idle", "connecting", "connected", "waiting", "closed"]

#: Error codes of an ``error`` frame that answer the frame the client sent last.
_REQUEST_ERRORS = {"invalid_json", "invalid_frame", "unknown_type", "frame_too_large"}
#: Until ``connection_established`` says otherwise (the server's default).
_DEFAULT_HEARTBEAT = 30.0
_FILTER_PARAMS = ("location_filter", "risk_threshold", "alert_types")


@dataclass(frozen=True)
class Delivery:
    """One alert as delivered: the ``alert`` frame's fields."""

    seq: int
    alert: dict[str, Any]
    redelivered: bool
    #: The frame as received (unknown fields included).
    frame: Frame = field(repr=False, compare=False)

    @property
    def alert_id(self) -> str:
        """The dedupe key as text: the integer 1042 and the string "1042" are one alert."""
        return str(self.alert.get("alert_id"))

    def expired(self, now: float | None = None) -> bool:
        expiry = _timestamp(self.alert.get("expiry_time"))
        return expiry is not None and expiry <= (time.time() if now is None else now)


@dataclass
class _Item:
    generation: int
    frame: Frame | None = None
    error: BaseException | None = None


@dataclass
class _Request:
    frame: Frame
    answer: str  # the frame type that answers it
    future: asyncio.Future[Frame]
    sent_in: int = 0  # connection generation it was last sent on (0: not sent)


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (unverified: only to know when to refresh)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
    except (IndexError, ValueError, AttributeError, TypeError):
        return None


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = (headers or {}).get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class TocsinClient:
    """A device of tocsin: ``async with TocsinClient(url, token, client_id=...) as c:``.

    ``url`` is the WebSocket URL (``ws://host:port/api/v1/alerts/ws``). ``filters`` (the
    keys of the connect query: ``location_filter`` as a dict, ``risk_threshold``,
    ``alert_types`` as a list) are sent on the first connection only, replacing the
    device's stored filters; later changes go through :meth:`update_filters` and are
    kept by the server across reconnects.
    """

    def __init__(
        self,
        url: str,
        token: TokenSource,
        *,
        client_id: str = "default",
        ack_mode: Literal["client", "auto"] = "client",
        filters: Mapping[str, Any] | None = None,
        seen: SeenStore | None = None,
        keep_seen_seconds: float = DEFAULT_KEEP_SECONDS,
        backoff: Backoff | None = None,
        refresh_before: float = 60.0,
        max_retry_after: float = 3600.0,
        ack_delay: float = 0.2,
        request_timeout: float = 30.0,
        compression: bool = False,
        max_failed_attempts: int | None = None,
        connect_timeout: float = 15.0,
        session: aiohttp.ClientSession | None = None,
        on_state: Callable[[State, str], None] | None = None,
    ) -> None:
        if ack_mode not in ("client", "auto"):
            raise ValueError(f"ack_mode: {ack_mode!r} is not 'client' or 'auto'")
        unknown = set(filters or {}) - set(_FILTER_PARAMS)
        if unknown:
            raise ValueError(f"filters: unknown key(s) {sorted(unknown)}; use {_FILTER_PARAMS}")
        self.url = url
        self.client_id = client_id
        self.ack_mode = ack_mode
        self.seen: SeenStore = seen if seen is not None else MemorySeenStore()
        self.keep_seen_seconds = keep_seen_seconds
        self.backoff = backoff or Backoff()
        self.refresh_before = refresh_before
        self.max_retry_after = max_retry_after
        self.ack_delay = ack_delay
        self.request_timeout = request_timeout
        self.compression = compression
        #: Give up (Unreachable) after this many attempts in a row that reached no gateway;
        #: None: never. May be changed while running (``tocsin tail`` sets it after the
        #: first connection).
        self.max_failed_attempts = max_failed_attempts
        #: A handshake not answered within this is abandoned (a frozen gateway accepts
        #: TCP but never answers the upgrade).
        self.connect_timeout = connect_timeout
        self._failed_attempts = 0
        self._on_state = on_state
        self._provider = None if isinstance(token, str) else token
        self._token: str | None = token if isinstance(token, str) else None
        self._filters = dict(filters or {})
        self._session = session
        self._own_session = session is None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._generation = 0
        self._established = asyncio.Event()
        self._established_frame: Frame | None = None
        self._requests: list[_Request] = []
        self._current: tuple[int, Delivery] | None = None
        self._ack_high = 0  # highest seq handled on the current connection
        self._ack_sent = 0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._rotating = False  # this client closed the socket to switch tokens
        self._wake = asyncio.Event()
        self.state: State = "idle"
        #: What ended the client, if it ended by itself (AuthError, Replaced, ...).
        self.failure: Exception | None = None
        #: The delay before the current (or last) reconnect, in seconds.
        self.last_delay: float | None = None
        #: Connections that reached ``connection_established`` (1 = never reconnected).
        self.connections = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> TocsinClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start connecting in the background (returns at once; see :meth:`connected`)."""
        if self._runner is not None:
            return
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run(), name=f"tocsin-client {self.client_id}")

    async def connected(self, timeout: float | None = None) -> Frame:
        """Wait for ``connection_established`` on the current connection and return it.

        Raises what ended the client if it ends first (:class:`AuthError`, ...)."""
        async with asyncio.timeout(timeout):
            while True:
                if self._established.is_set() and self._established_frame is not None:
                    return self._established_frame
                if self._runner is None:
                    raise ClientClosed("start() the client first")
                if self._runner.done():
                    raise self.failure or ClientClosed("the client is closed")
                waiter = asyncio.ensure_future(self._established.wait())
                await asyncio.wait({waiter, self._runner}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()

    async def close(self) -> None:
        """Ack what was handled, close the socket (1000) and stop reconnecting."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        await self._flush_acks()
        ws = self._ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        for request in self._requests:
            if not request.future.done():
                request.future.set_exception(ClientClosed("closed before the answer came"))
        self._requests.clear()
        if self._own_session and self._session is not None:
            await self._session.close()
        self._set_state("closed", "")
        self._queue.put_nowait(_Item(self._generation))

    # ------------------------------------------------------------------ reading

    async def alerts(self) -> AsyncIterator[Delivery]:
        """Every alert, once: duplicates (by ``alert_id``) and expired alerts are skipped
        (and acked). The previous alert is handled when you ask for the next one."""
        async for delivery in self._iterate(alerts_only=True):
            assert isinstance(delivery, Delivery)
            yield delivery

    async def frames(self) -> AsyncIterator[Frame]:
        """Every server frame as a dict (pings, answers, errors, alerts), alerts deduped
        as in :meth:`alerts`. Use one of the two iterators, not both."""
        async for frame in self._iterate(alerts_only=False):
            assert isinstance(frame, dict)
            yield frame

    async def _iterate(self, alerts_only: bool) -> AsyncIterator[Delivery | Frame]:
        while True:
            await self._handled()
            item = await self._next_item()
            if item is None:
                return
            frame = item.frame
            assert frame is not None
            if frame.get("type") == "alert":
                delivery = _delivery(frame)
                if delivery is None:
                    continue
                if delivery.expired() or await self.seen.contains(delivery.alert_id):
                    self._processed(item.generation, delivery.seq)
                    continue
                self._current = (item.generation, delivery)
                yield delivery if alerts_only else frame
            elif not alerts_only:
                yield frame

    async def _next_item(self) -> _Item | None:
        if self._queue.empty():
            await self._flush_acks()  # about to wait: what was handled goes out now
        item = await self._queue.get()
        if item.error is not None:
            raise item.error
        return item if item.frame is not None else None

    async def ack(self, delivery: Delivery | None = None) -> None:
        """Mark the alert being handled as done now and send the ack at once (the
        iterators do this by themselves when asked for the next alert)."""
        if delivery is None or (self._current is not None and self._current[1] is delivery):
            await self._handled()
        await self._flush_acks()

    async def _handled(self) -> None:
        if self._current is None:
            return
        generation, delivery = self._current
        self._current = None
        forget = time.time() + self.keep_seen_seconds
        expiry = _timestamp(delivery.alert.get("expiry_time"))
        await self.seen.add(delivery.alert_id, max(forget, expiry or 0.0))
        self._processed(generation, delivery.seq)

    def _processed(self, generation: int, seq: int) -> None:
        # An alert of an earlier connection is acked by its redelivery, not on this one.
        if self.ack_mode != "client" or generation != self._generation:
            return
        self._ack_high = max(self._ack_high, seq)
        if self._ack_timer is None and self._ack_high > self._ack_sent:
            loop = asyncio.get_running_loop()
            self._ack_timer = loop.call_later(
                self.ack_delay, lambda: self._spawn(self._flush_acks())
            )

    async def _flush_acks(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        ws, high = self._ws, self._ack_high
        if ws is None or ws.closed or high <= self._ack_sent:
            return
        self._ack_sent = high
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await ws.send_str(json.dumps({"type": "ack", "seq": high}))

    # ------------------------------------------------------------------ requests

    async def subscribe(self, groups: Iterable[str]) -> Frame:
        """Subscribe the device to groups (``region:KE-30``, ``level:high``, ...); returns
        the ``subscription_response`` (raises :class:`SubscriptionRefused` unless ok)."""
        return await self._subscription({"type": "subscribe", "groups": list(groups)})

    async def unsubscribe(self, groups: Iterable[str]) -> Frame:
        return await self._subscription({"type": "unsubscribe", "groups": list(groups)})

    async def update_filters(self, filters: Mapping[str, Any]) -> Frame:
        """Replace the device's filters (``{}`` clears them); returns the response."""
        return await self._subscription({"type": "update_filters", "filters": dict(filters)})

    async def get_stats(self) -> Frame:
        """This connection's ``connection_stats``."""
        return await self._request({"type": "get_stats"}, "connection_stats")

    async def _subscription(self, frame: Frame) -> Frame:
        response = await self._request(frame, "subscription_response")
        if response.get("status") != "ok":
            raise SubscriptionRefused(response)
        return response

    async def _request(self, frame: Frame, answer: str) -> Frame:
        """Send ``frame`` (now, or once connected) and wait for its answer; a request whose
        connection dropped before the answer is sent again on the next one (the
        subscription frames are idempotent)."""
        if self._closing:
            raise ClientClosed("the client is closed")
        request = _Request(frame, answer, asyncio.get_running_loop().create_future())
        self._requests.append(request)
        if self._established.is_set():
            await self._send_request(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), self.request_timeout)
        finally:
            if request in self._requests:
                self._requests.remove(request)

    async def _send_request(self, request: _Request) -> None:
        ws = self._ws
        if ws is None or ws.closed or request.sent_in == self._generation:
            return
        request.sent_in = self._generation
        with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
            await ws.send_str(json.dumps(request.frame))

    def _answer(self, frame: Frame) -> None:
        for request in self._requests:
            if (
                request.answer == frame["type"]
                and request.sent_in == self._generation
                and not request.future.done()
                and (
                    frame["type"] != "subscription_response"
                    or frame.get("action") == request.frame["type"]
                )
            ):
                request.future.set_result(frame)
                return

    def _reject(self, frame: Frame) -> None:
        for request in self._requests:
            if request.sent_in == self._generation and not request.future.done():
                request.future.set_exception(
                    ProtocolError(str(frame.get("code")), str(frame.get("detail", "")), frame)
                )
                return

    # ------------------------------------------------------------------ connection

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, state: State, detail: str) -> None:
        self.state = state
        if self._on_state is not None:
            self._on_state(state, detail)

    async def _fresh_token(self, force: bool) -> str:
        if self._provider is None:
            assert self._token is not None
            return self._token
        exp = None if self._token is None else token_expiry(self._token)
        if (
            force
            or self._token is None
            or (exp is not None and exp - time.time() < self.refresh_before)
        ):
            value = self._provider()
            self._token = value if isinstance(value, str) else await value
        return self._token

    async def _run(self) -> None:
        force_refresh = False
        try:
            while not self._closing:
                delay, force_refresh = await self._connect_once(force_refresh)
                if self._closing:
                    break
                self.last_delay = delay
                self._set_state("waiting", f"reconnecting in {delay:.2f} s")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
        except Exception as exc:  # TocsinError, or a bug: either way the application hears it
            self._queue.put_nowait(_Item(self._generation, error=exc))
            for request in self._requests:
                if not request.future.done():
                    request.future.set_exception(exc)
            self.failure = exc
            self._set_state("closed", str(exc))
        finally:
            self._established.clear()

    async def _connect_once(self, force_refresh: bool) -> tuple[float, bool]:
        """One connection, from handshake to close: returns (delay, refresh the token)."""
        assert self._session is not None
        try:
            token = await self._fresh_token(force_refresh)
        except Exception as exc:  # the identity provider is away: try again later
            log.warning("tocsin: the token callable failed: %r", exc)
            return self.backoff.next_delay(), force_refresh
        params: dict[str, str] = {
            "auth_token": token,
            "client_id": self.client_id,
            "ack_mode": self.ack_mode,
        }
        if self.compression:
            params["compression"] = "deflate"
        if self.connections == 0:
            params |= _filter_params(self._filters)
        self._set_state("connecting", self.url)
        try:
            async with asyncio.timeout(self.connect_timeout):
                ws = await self._session.ws_connect(
                    self.url,
                    params=params,
                    autoping=True,
                    compress=15 if self.compression else 0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=5.0),
                )
        except aiohttp.WSServerHandshakeError as exc:
            return await self._refused(exc.status, exc.headers, params, force_refresh)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("tocsin: cannot connect to %s: %s", self.url, exc)
            self._failed_attempts += 1
            limit = self.max_failed_attempts
            if limit is not None and self._failed_attempts >= limit:
                reason = str(exc) or type(exc).__name__
                raise Unreachable(self.url, self._failed_attempts, reason) from exc
            return self.backoff.next_delay(), False
        self._failed_attempts = 0
        self._generation += 1
        self._ws = ws
        self._ack_high = self._ack_sent = 0
        self._rotating = False
        refresh: asyncio.TimerHandle | None = None
        try:
            refresh = await self._read(ws)
        finally:
            if refresh is not None:
                refresh.cancel()
            self._established.clear()
            self._ws = None
            if not ws.closed:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1)
        return self._after_close(ws.close_code)

    async def _refused(
        self, status: int, headers: Any, params: dict[str, str], refreshed: bool
    ) -> tuple[float, bool]:
        body = await self._refusal_body(status, params)
        retry_after = _retry_after(headers)
        if status == 401 and self._provider is not None and not refreshed:
            return 0.0, True  # once more, with a token fresh from the provider
        if status in (401, 403):
            raise AuthError(status, body)
        if status == 400:
            raise InvalidParameter(status, body)
        if status in (429, 503):
            wait = retry_after if retry_after is not None else self.backoff.next_delay()
            if wait > self.max_retry_after:
                raise LimitError(status, body, retry_after)
            return wait + self.backoff.jitter(), False
        log.info("tocsin: %s refused the handshake: HTTP %s %s", self.url, status, body)
        return self.backoff.next_delay(), False

    async def _refusal_body(self, status: int, params: dict[str, str]) -> dict[str, Any]:
        """aiohttp drops a refusal's body: ask again without the upgrade (the gateway runs
        the same checks for a plain GET and answers the same status and body)."""
        assert self._session is not None
        http = self.url.replace("wss://", "https://", 1).replace("ws://", "http://", 1)
        try:
            limit = aiohttp.ClientTimeout(total=self.connect_timeout)
            async with self._session.get(http, params=params, timeout=limit) as resp:
                if resp.status == status:
                    body = await resp.json(content_type=None)
                    if isinstance(body, dict):
                        return body
        except (aiohttp.ClientError, ValueError, OSError, TimeoutError):
            pass
        return {}

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> asyncio.TimerHandle | None:
        heartbeat = _DEFAULT_HEARTBEAT
        refresh: asyncio.TimerHandle | None = None
        while True:
            try:
                msg = await ws.receive(timeout=2 * heartbeat)
            except TimeoutError:
                # Nothing (not even a ping) for two intervals: the link is dead.
                log.info("tocsin: nothing received for %.0f s; reconnecting", 2 * heartbeat)
                return refresh
            if msg.type is not aiohttp.WSMsgType.TEXT:
                if msg.type in (
                    aiohttp.WSMsgType.BINARY,
                    aiohttp.WSMsgType.PING,
                    aiohttp.WSMsgType.PONG,
                ):
                    continue
                return refresh
            try:
                frame = json.loads(msg.data)
            except ValueError:
                continue
            if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
                continue
            kind = frame["type"]
            if kind == "ping":
                with contextlib.suppress(ConnectionError, RuntimeError, aiohttp.ClientError):
                    await ws.send_str(json.dumps({"type": "pong", "ts": frame.get("ts")}))
            elif kind == "connection_established":
                interval = frame.get("heartbeat_interval")
                if isinstance(interval, int | float) and interval > 0:
                    heartbeat = float(interval)
                self.connections += 1
                self.backoff.reset()
                self._established_frame = frame
                self._established.set()
                self._set_state("connected", str(frame.get("connection_id", "")))
                refresh = self._schedule_refresh(ws)
                for request in list(self._requests):
                    await self._send_request(request)
            elif kind in ("subscription_response", "connection_stats"):
                self._answer(frame)
            elif kind == "error" and frame.get("code") in _REQUEST_ERRORS:
                self._reject(frame)
            self._queue.put_nowait(_Item(self._generation, frame))

    def _schedule_refresh(self, ws: aiohttp.ClientWebSocketResponse) -> asyncio.TimerHandle | None:
        """With a token provider: shortly before ``exp``, get a new token, close this socket
        and connect again with it (the device's queue makes the switch lossless)."""
        exp = None if self._token is None else token_expiry(self._token)
        if self._provider is None or exp is None:
            return None
        delay = max(0.0, exp - self.refresh_before - time.time())

        async def rotate() -> None:
            try:
                await self._fresh_token(True)
            except Exception as exc:  # the provider failed: 4401 comes, and we ask again
                log.warning("tocsin: token refresh failed: %s", exc)
                return
            self._rotating = True
            await self._flush_acks()
            with contextlib.suppress(Exception):
                await ws.close(message=b"token refresh")

        loop = asyncio.get_running_loop()
        return loop.call_later(delay, lambda: self._spawn(rotate()))

    def _after_close(self, code: int | None) -> tuple[float, bool]:
        if self._closing:
            return 0.0, False
        if code == 4009:
            raise Replaced()
        if code == 4401:
            if self._provider is None:
                raise AuthError(401, {"error": "token_expired", "detail": "close code 4401"})
            return self.backoff.jitter(), True
        if self._rotating:
            return 0.0, False
        if code == 1001:
            return self.backoff.jitter(), False
        return self.backoff.next_delay(), False


def _delivery(frame: Frame) -> Delivery | None:
    seq, alert = frame.get("seq"), frame.get("alert")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(alert, dict):
        return None
    return Delivery(seq, alert, bool(frame.get("redelivered", False)), frame)


def _filter_params(filters: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in filters.items():
        if value is None:
            continue
        if key == "location_filter" and not isinstance(value, str):
            out[key] = json.dumps(value, separators=(",", ":"))
        elif key == "alert_types" and not isinstance(value, str):
            out[key] = ",".join(value)
        else:
            out[key] = str(value)
    return out
