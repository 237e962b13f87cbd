"""``GET /api/v1/alerts/stats`` and the same figures on NATS (``tocsin status``).

Per instance, exact: counters come from the session registry (registry.py), which counts
every alert frame this process wrote, every warning it sent, every open socket. What only
JetStream knows (the offline queues of all devices, the streams, the cluster) is read from
it at most once per ``TOCSIN_STATS_CACHE_SECONDS`` by one reader at a time, so a scrape
storm costs JetStream nothing; the answer says when it was read (``read_at``).

``offline_queues`` counts, over every device queue (durable consumer on ``ALERTS``), the
alerts the device has not acknowledged: ``num_pending`` (not yet delivered) plus
``num_ack_pending`` (delivered, not acked). ``queued_users`` are the distinct users with
at least one such alert; ``queued_devices`` the devices.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson
from aiohttp import web
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerInfo

from tocsin.core.auth import Role, TokenError, bearer

from .registry import RECENT_SECONDS, iso_time

if TYPE_CHECKING:
    from .context import Gateway

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Roles that may read the stats (CONTRACT §7).
READERS = frozenset({Role.ADMIN, Role.ANALYST})


@dataclass
class Cached(Generic[T]):
    """A value read at most once per ``seconds``; concurrent callers share one read."""

    read: Callable[[], Awaitable[T]]
    seconds: float
    value: T | None = None
    read_at: float = 0.0  # unix time
    _at: float = -1e18  # monotonic
    _pending: asyncio.Future[T] | None = field(default=None, repr=False)

    async def get(self) -> T:
        if self.value is not None and time.monotonic() - self._at < self.seconds:
            return self.value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh())
        try:
            return await asyncio.shield(self._pending)
        finally:
            if self._pending is not None and self._pending.done():
                self._pending = None

    async def _refresh(self) -> T:
        value = await self.read()
        self.value, self._at, self.read_at = value, time.monotonic(), time.time()
        return value


@dataclass(frozen=True)
class Queues:
    total_queued_messages: int
    queued_users: int
    queued_devices: int
    devices: int  # device queues in all


class Stats:
    """The stats of one gateway; the JetStream parts cached."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        seconds = gw.settings.stats_cache_seconds
        self.queues: Cached[Queues] = Cached(self._read_queues, seconds)
        self.cluster: Cached[dict[str, Any]] = Cached(self._read_cluster, seconds)
        self._sub: Any = None

    # ------------------------------------------------------------ JetStream reads
    async def device_queues(self) -> list[ConsumerInfo]:
        infos: list[ConsumerInfo] = await self.gw.js.consumers_info(self.gw.names.alerts_stream)
        return infos

    async def _read_queues(self) -> Queues:
        names = self.gw.names
        total = devices = queued = 0
        users: set[str] = set()
        for info in await self.device_queues():
            device = names.device_of(info.name or "", info.config.metadata)
            if device is None:
                continue  # not a device queue (an operator's consumer, say)
            devices += 1
            waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)
            if waiting:
                total += waiting
                queued += 1
                users.add(device[0])
        task = self.gw.sessions.task("offline_queues")
        task.ran()
        return Queues(total, len(users), queued, devices)

    async def _read_cluster(self) -> dict[str, Any]:
        js, names = self.gw.js, self.gw.names
        streams: dict[str, Any] = {}
        for name in names.streams:
            try:
                info = await js.stream_info(name)
            except Exception as exc:  # a stream missing is what readiness reports
                streams[name] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            state, cluster = info.state, info.cluster
            streams[name] = {
                "messages": state.messages,
                "bytes": state.bytes,
                "first_seq": state.first_seq,
                "last_seq": state.last_seq,
                "consumers": state.consumer_count,
                "replicas": info.config.num_replicas,
                "leader": cluster.leader if cluster is not None else None,
            }
        dlq = streams.get(names.dlq_stream, {})
        return {
            "streams": streams,
            "dlq_messages": dlq.get("messages"),
            "device_consumers": streams.get(names.alerts_stream, {}).get("consumers"),
            # The JetStream meta leader is visible to the system account only ($SYS, /jsz);
            # each stream's own leader is above.
            "meta_leader": None,
        }

    async def refresh_quietly(self) -> None:
        """Bring the cached JetStream figures up to date if NATS is there (for /metrics:
        a failure leaves the last figures and is reported in the stats' tasks)."""
        if not self.gw.nc.is_connected:
            return
        try:
            await self.queues.get()
            await self.cluster.get()
        except Exception as exc:
            self.gw.sessions.task("offline_queues").ran(exc)
            log.warning("metrics: could not read JetStream: %s", exc)

    # ------------------------------------------------------------ the answer
    async def body(self) -> dict[str, Any]:
        gw = self.gw
        sessions = gw.sessions
        now_mono, now = time.monotonic(), time.time()
        nats_connected = gw.nc.is_connected
        await self.refresh_quietly()
        queues, cluster = self.queues.value, self.cluster.value
        tasks = gw.task_statuses()
        avg = sessions.timings.recent.mean(now)
        return {
            "instance": gw.instance,
            "active_connections": len(sessions),
            "healthy_connections": sessions.healthy(now_mono),
            "avg_latency_ms": None if avg is None else round(avg * 1000, 3),
            "avg_latency_window_seconds": RECENT_SECONDS,
            "avg_latency_of": "append to ALERTS -> alert frame written, first sends",
            "messages_sent": sessions.sent,
            "redelivered": sessions.redelivered,
            "acks": sessions.acks,
            "rate_limit_violations": sessions.rate_limit_warnings,
            "system_health": {
                "nats_connected": nats_connected,
                "background_tasks_running": tasks,
                "all_background_tasks_running": all(t["running"] for t in tasks.values()),
                "shutting_down": gw.shutting_down,
            },
            "offline_queues": {
                "total_queued_messages": queues.total_queued_messages if queues else None,
                "queued_users": queues.queued_users if queues else None,
                "queued_devices": queues.queued_devices if queues else None,
                "device_queues": queues.devices if queues else None,
                "read_at": iso_time(self.queues.read_at or None),
            },
            "cluster": None
            if cluster is None
            else {**cluster, "read_at": iso_time(self.cluster.read_at)},
            "generated_at": iso_time(now),
        }

    # ------------------------------------------------------------ NATS
    async def start(self) -> None:
        self._sub = await self.gw.nc.subscribe(
            self.gw.names.gateways_stats_subject, cb=self._on_request
        )

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                log.debug("stats unsubscribe failed", exc_info=True)
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        if not msg.reply:
            return
        self.gw.spawn(self._answer(msg.reply))

    async def _answer(self, reply: str) -> None:
        try:
            body = await self.body()
            await self.gw.nc.publish(reply, orjson.dumps(body))
        except Exception as exc:
            log.warning("stats request not answered: %s", exc)


async def gather_gateways(
    nc: Client, subject: str, wait: float, expect: int | None = None
) -> dict[str, Any]:
    """Ask every gateway at once; gather the answers that come within ``wait`` seconds.

    One request, one reply inbox, no queue group: each gateway subscribed to ``subject``
    answers. A 503 status (NATS's "no responders") ends the wait at once, and so does the
    ``expect``-th answer (readable or not) when the caller knows how many gateways run.
    """
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replies: list[dict[str, Any]] = []
    unreadable = 0
    nobody = False
    try:
        await nc.publish(subject, b"", reply=inbox)
        deadline = loop.time() + wait
        while (remaining := deadline - loop.time()) > 0:
            try:
                msg = await sub.next_msg(timeout=remaining)
            except NatsTimeout:
                break
            if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
                nobody = True  # nobody is subscribed
                break
            try:
                body = orjson.loads(msg.data)
            except ValueError:
                body = None
            if isinstance(body, dict):
                replies.append(body)
            else:
                unreadable += 1
            if expect is not None and len(replies) + unreadable >= expect:
                break
    finally:
        await sub.unsubscribe()
    replies.sort(key=lambda r: str(r.get("instance", "")))
    return {
        "subject": subject,
        "wait_seconds": wait,
        "answered": len(replies),
        "unreadable": unreadable,
        "no_responders": nobody,
        "replies": replies,
    }


async def authorize_reader(request: web.Request) -> web.Response | None:
    """None when the request's token (``Authorization: Bearer`` or ``auth_token``) holds
    ``admin`` or ``analyst``; else the 401 or 403 to answer."""
    from .handler import GATEWAY

    gw = request.app[GATEWAY]
    token = bearer(request.headers.get("Authorization")) or request.query.get("auth_token")
    try:
        claims = await gw.verifier.averify(token)
    except TokenError as exc:
        return web.json_response({"error": exc.error, "detail": exc.detail}, status=401)
    if not READERS.intersection(claims.roles):
        return web.json_response(
            {"error": "forbidden", "detail": "roles: the stats need 'admin' or 'analyst'"},
            status=403,
        )
    return None


def json_body(body: Any) -> web.Response:
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode())


async def stats_handler(request: web.Request) -> web.Response:
    from .handler import GATEWAY

    refused = await authorize_reader(request)
    if refused is not None:
        return refused
    return json_body(await request.app[GATEWAY].stats.body())
