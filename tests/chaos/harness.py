"""The chaos harness: real processes on loopback, an engine, devices, a fault schedule.

A :class:`Scene` owns one nats-server (file storage, restartable) or, with ``cluster=True``,
a 3-node :class:`~tocsin.core.embedded.NatsCluster` (streams R3, device queues R1; every
process gets all three URLs), one ingest process and
N gateway processes (each keeps its port across ``kill -9`` and restart), optionally behind
a :class:`~tests.chaos.proxy.RoundRobinProxy`. The :class:`Engine` publishes to the ingest
subject through JetStream (``Nats-Msg-Id`` = alert_id) and records each PubAck'ed alert;
each :class:`DeviceClient` records every frame, tagged with the connection (a
:class:`~tests.chaos.verifier.Connection`, carrying the token it used) that received it.
Devices whose behaviour is ``concurrent``, ``token_change`` or ``stalled`` hold several
connections (:class:`Link`) at once; their injectors (:func:`concurrent_connects`,
:func:`token_changes`, :func:`stalled_readers`) drive them. Waiting is on conditions with
deadlines; random sleeps only shape the load (churn delays, downtimes) or are the fault
itself (how long a reader stalls).

Bad networks (``run_scenario(netem=...)``, tests/chaos/test_bad_network.py): each device
gets its own :class:`tocsin.bench.netem.Link` (latency, bandwidth, stalls, blackholes,
cuts) between it and the gateway or the proxy, so all its connections share that link's
state; :func:`link_outages` runs the links' outages. With ``backoff`` (:class:`Backoff`)
the clients reconnect as an SDK does (exponential backoff with full jitter, close codes
honoured: 4009 stops them) and abort a connection silent for two heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tocsin.bench.netem import Link as NetLink
from tocsin.bench.netem import Profile, small_window
from tocsin.core.auth import mint_token
from tocsin.core.embedded import (
    NatsCluster,
    NatsServer,
    free_port,
    stop_process,
)
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.supervisor import settings_env
from tocsin.core.topology import apply_topology
from tocsin.schemas.codes import Close

from ..conftest import SECRET
from ..support import GatewayProcess, spawn_tocsin
from .proxy import RoundRobinProxy
from .verifier import (
    REPLACED,
    Connection,
    DeviceSpec,
    Fault,
    Overlap,
    Report,
    Stall,
    Token,
    Verifier,
    ref_alert,
)

LONG = os.environ.get("TOCSIN_CHAOS", "").lower() == "long"


@dataclass(frozen=True)
class Mode:
    name: str
    load_seconds: float  # how long the engine publishes
    rate: float  # alerts per second
    max_alerts: int  # the load loop's bound in count
    drain_seconds: float  # deadline for every device to have everything after the faults
    copies: int  # each device profile this many times (different client_ids)
    faults: int  # faults of each kind a scenario injects

    @property
    def timeout(self) -> float:
        """A pytest timeout that fits one scenario: setup, load, drain and teardown."""
        return 90 + self.load_seconds * 1.5 + self.drain_seconds


def chaos_mode() -> Mode:
    if LONG:
        seconds = float(os.environ.get("TOCSIN_CHAOS_SECONDS", "60"))
        return Mode("long", seconds, 25.0, int(seconds * 25 * 1.2) + 10, 90.0, 2, 6)
    return Mode("short", 3.0, 40.0, 150, 45.0, 1, 1)


MODE = chaos_mode()

# ----------------------------------------------------------------------- processes


@dataclass
class Scene:
    tmp: Path
    gateways: int = 1
    use_proxy: bool = False
    cluster: bool = False  # 3 nodes: streams R3, device queues R1
    namespace: str = field(default_factory=lambda: "c" + uuid.uuid4().hex[:10])
    nats: NatsServer | None = None
    nodes: NatsCluster | None = None
    nc: NatsClient | None = None
    js: JetStreamContext | None = None
    settings: Settings | None = None
    env: dict[str, str] = field(default_factory=dict)
    gws: list[GatewayProcess] = field(default_factory=list)
    ingest: subprocess.Popen[bytes] | None = None
    proxy: RoundRobinProxy | None = None
    clients: list[DeviceClient] = field(default_factory=list)
    #: Settings that differ from the suite's (e.g. a shorter heartbeat for stalled readers).
    overrides: dict[str, Any] = field(default_factory=dict)
    engine: Engine | None = None  # the scenario's publisher (a stalled reader asks a burst)

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def ws_url(self) -> str:
        return self.proxy.ws_url if self.proxy is not None else self.gws[0].ws_url

    @property
    def upstream(self) -> tuple[str, int]:
        """Where a device's bad-network link forwards to: the proxy, or the gateway."""
        if self.proxy is not None:
            return self.proxy.host, self.proxy.port
        return "127.0.0.1", self.gws[0].port

    async def start(self) -> None:
        if self.cluster:
            self.nodes = NatsCluster(self.tmp / "cluster", size=3)
            await asyncio.to_thread(self.nodes.start, 60)
            urls = self.nodes.urls
        else:
            self.nats = NatsServer(store_dir=self.tmp / "nats", log_file=self.tmp / "nats.log")
            await asyncio.to_thread(self.nats.start)
            urls = [self.nats.url]
        self.settings = Settings(
            nats_url=urls,
            replicas=3 if self.cluster else 1,
            device_replicas=1,
            namespace=self.namespace,
            jwt_secret=SECRET,
            http_port=0,
            data_dir=self.tmp / "data",
            heartbeat_seconds=5,
            redelivery_backoff=[1.0, 2.0, 4.0, 8.0],
            checkpoint_seconds=0.2,
            shutdown_grace_seconds=5,
            # never truncate: every alert must be delivered (the verifier asserts it)
            offline_queue_max=1_000_000,
            max_inflight=10_000,  # clients that never ack still receive everything
            # The suite's devices are not abusers (the limits have tests of their own):
            # several devices of one user, and bursts of frames, must not be refused.
            max_connections_per_user=100,
            max_messages_per_minute=60_000,
            rate_limit_burst=10_000,
        ).model_copy(update=self.overrides)
        self.env = settings_env(self.settings) | {
            "TOCSIN_MAX_INFLIGHT": str(self.settings.max_inflight),
            "TOCSIN_MAX_MESSAGES_PER_MINUTE": "1000000",
            "TOCSIN_MAX_CONNECTIONS_PER_USER": "50",
            "TOCSIN_LOG_LEVEL": "WARNING",  # keeps "rebuilt the queue" (a warning)
            "TOCSIN_REPLICAS": str(self.settings.replicas),
            "TOCSIN_DEVICE_REPLICAS": str(self.settings.device_replicas),
        }
        self.nc = await nats.connect(urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        self.js = self.nc.jetstream(timeout=3)
        await apply_topology(self.js, self.settings, self.names)
        self.gws = [
            GatewayProcess(free_port(), self.tmp / f"gateway-{i}.log", self.env)
            for i in range(self.gateways)
        ]
        for gw in self.gws:
            gw.start()
        self.start_ingest()
        await asyncio.gather(*(asyncio.to_thread(gw.wait_up) for gw in self.gws))
        if self.use_proxy:
            self.proxy = await RoundRobinProxy([("127.0.0.1", g.port) for g in self.gws]).start()

    def start_ingest(self) -> None:
        self.ingest = spawn_tocsin(["ingest"], self.env, self.tmp / "ingest.log")

    def kill_ingest(self) -> None:
        if self.ingest is not None:
            stop_process(self.ingest, 5, signal.SIGKILL)

    async def restart_nats(self) -> None:
        assert self.nats is not None
        await asyncio.to_thread(self.nats.stop)
        await asyncio.to_thread(self.nats.start)  # same port, same store

    # ------------------------------------------------------------------ a cluster
    def node_index(self, server_name: str | None) -> int | None:
        assert self.nodes is not None
        names = [n.name for n in self.nodes.nodes]
        return names.index(server_name) if server_name in names else None

    async def leaders(self, timeout: float = 2.5) -> dict[str, int | None]:
        """Stream -> index of the node leading it (None: no leader now, e.g. electing)."""
        assert self.js is not None
        n = self.names

        async def leader(stream: str) -> int | None:
            assert self.js is not None
            try:
                info = await asyncio.wait_for(self.js.stream_info(stream), timeout)
            except Exception:  # electing, or no quorum: no leader to name
                return None
            return self.node_index(info.cluster.leader if info.cluster else None)

        streams = [n.alerts_stream, n.devices_stream, n.ingest_stream]
        found = await asyncio.gather(*(leader(s) for s in streams))
        return dict(zip(streams, found, strict=True))

    async def queue_hosts(self, timeout: float = 1.5) -> dict[str, int | None]:
        """Device key -> index of the node holding its (R1) queue; None: it did not answer."""
        assert self.js is not None

        async def host(c: DeviceClient) -> int | None:
            assert self.js is not None
            name = self.names.device_consumer(c.spec.user, c.spec.client_id)
            try:
                info = await self.js.consumer_info(self.names.alerts_stream, name, timeout=timeout)
            except Exception:  # its node is down (a request timeout), or electing
                return None
            return self.node_index(info.cluster.leader if info.cluster else None)

        found = await asyncio.gather(*(host(c) for c in self.clients))
        return {c.spec.key: node for c, node in zip(self.clients, found, strict=True)}

    def queues_rebuilt(self) -> int:
        """How many queues the gateways rebuilt (their logs; a restarted one appends)."""
        return sum(
            (gw.log.read_text(errors="replace") if gw.log.exists() else "").count(
                "rebuilt the queue"
            )
            for gw in self.gws
        )

    async def stream_seqs(self) -> dict[int | str, int]:
        """alert_id -> ALERTS sequence of every stored alert."""
        assert self.js is not None
        stream = self.names.alerts_stream
        info = await self.js.stream_info(stream)
        seqs: dict[int | str, int] = {}
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                msg = await self.js.get_msg(stream, seq)
                assert msg.data is not None, f"{stream} seq {seq} has no payload"
                seqs[orjson.loads(msg.data)["alert_id"]] = seq
        return seqs

    async def stop(self) -> None:
        for c in self.clients:
            if c.netlink is not None:
                await c.netlink.stop()
        if self.proxy is not None:
            await self.proxy.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

        def stop_all() -> None:
            if self.ingest is not None:
                stop_process(self.ingest, 10)
            for gw in self.gws:
                gw.stop()
            if self.nats is not None:
                self.nats.stop()
            if self.nodes is not None:
                self.nodes.stop()

        await asyncio.to_thread(stop_all)


# ----------------------------------------------------------------------- the engine

REGIONS = ["KE", "KE-30", "KE-01", "KE-301", "UG", "UG-102", "UG-103", "TZ-01"]
LEVELS = ["low", "medium", "high", "critical", "emergency"]
PRIORITIES = ["low", "normal", "high", "urgent", "emergency"]
TYPES = ["outbreak_risk", "system_health", "data_quality"]
_ids = [time.time_ns() // 1000]


#: A 4-byte UTF-8 character: 7,400 of them make a ~30 KB alert within the 8,000-character
#: message limit (and the 64 KiB event limit).
LARGE_MESSAGE = "\U0001f99f" * 7400


def make_alert(
    rng: random.Random, large: bool = False, region: str | None = None
) -> dict[str, Any]:
    _ids[0] += 1
    location: dict[str, Any] = {"region": region or rng.choice(REGIONS)}
    if rng.random() < 0.6:
        location["lat"] = round(rng.uniform(-3, 3), 4)
        location["lon"] = round(rng.uniform(30, 38), 4)
    body: dict[str, Any] = {
        "alert_id": _ids[0],
        "alert_level": rng.choice(LEVELS),
        "alert_type": rng.choice(TYPES),
        "title": "Chaos alert",
        "message": LARGE_MESSAGE if large else "Risk model predicts a rise in cases. " * 8,
        "priority": rng.choice(PRIORITIES),
        "location": location,
    }
    if rng.random() < 0.8:
        body["risk_score"] = round(rng.random(), 2)
    return body


@dataclass
class Engine:
    """Publishes alerts to the ingest subject; only PubAck'ed alerts count as published."""

    scene: Scene
    verifier: Verifier
    rng: random.Random
    retries: int = 0
    large: float = 0.0  # the share of ~30 KB alerts

    async def publish(self, body: dict[str, Any], deadline: float) -> None:
        assert self.scene.js is not None
        payload = orjson.dumps(body)
        headers = {"Nats-Msg-Id": str(body["alert_id"])}
        attempted = time.monotonic()
        while True:
            try:
                await self.scene.js.publish(
                    self.scene.names.ingest_subject, payload, headers=headers, timeout=2
                )
            except Exception:  # NATS restarting, a stream electing or without quorum: the
                # same alert_id again (deduped)
                if time.monotonic() > deadline:
                    raise AssertionError(f"alert {body['alert_id']} never PubAck'ed") from None
                self.retries += 1
                await asyncio.sleep(0.1)
                continue
            self.verifier.record_publish(body, time.monotonic(), attempted)
            return

    async def probes(self, specs: list[DeviceSpec]) -> dict[str, set[int | str]]:
        """Publish, for each of ``specs``, an alert its filters select (made at random,
        PROBE_TRIES at most; a bounded search, nothing is published meanwhile). Returns
        device key -> the published probes it must receive."""
        bodies = []
        for spec in specs:
            for _ in range(PROBE_TRIES):
                body = make_alert(self.rng)
                if spec.matches(ref_alert(body)) is True:
                    bodies.append(body)
                    break
        deadline = time.monotonic() + 30
        await asyncio.gather(*(self.publish(b, deadline) for b in bodies))
        return {
            spec.key: {b["alert_id"] for b in bodies if spec.matches(ref_alert(b)) is True}
            for spec in specs
        }

    async def burst(self, count: int, region: str) -> None:
        """``count`` ~30 KB alerts for ``region``, published all at once."""
        deadline = time.monotonic() + 30
        bodies = [make_alert(self.rng, large=True, region=region) for _ in range(count)]
        await asyncio.gather(*(self.publish(b, deadline) for b in bodies))

    async def run(
        self,
        mode: Mode,
        hold: asyncio.Event | None = None,
        tail: float = 0.0,
        cap: float = 300.0,
    ) -> None:
        """Publish at ``mode.rate`` for ``mode.load_seconds``; with ``hold``, also until it is
        set and ``tail`` seconds more (the load spans the faults and the heal). Bounded by
        ``cap`` seconds and, in count, by what ``cap`` allows at the rate."""
        start = time.monotonic()
        end = start + mode.load_seconds
        released: float | None = None
        limit = mode.max_alerts if hold is None else int(cap * mode.rate) + 10
        for n in range(limit):
            now = time.monotonic()
            if hold is not None:
                if not hold.is_set():
                    end = max(end, now + 1)
                elif released is None:
                    released = now
                    end = max(end, now + tail)
            if now >= end or now >= start + cap:
                break
            # 90 s: covers a quorum loss, the restarts and the re-elections that follow
            body = make_alert(self.rng, large=self.rng.random() < self.large)
            await self.publish(body, now + 90)
            due = start + (n + 1) / mode.rate  # pacing: load shaping, not synchronisation
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())


# ----------------------------------------------------------------------- devices


def device_token(spec: DeviceSpec, regions: Token | str = "spec") -> str:
    """The device's token; ``regions`` another one of its tokens (None: admin)."""
    chosen = spec.regions if isinstance(regions, str) else regions
    if chosen is None:
        return mint_token(SECRET, spec.user, roles=("admin",), regions=())
    return mint_token(SECRET, spec.user, regions=chosen)


def transport_of(ws: aiohttp.ClientWebSocketResponse) -> asyncio.Transport | None:
    conn = ws._conn
    return None if conn is None else conn.transport


def live_transport(ws: aiohttp.ClientWebSocketResponse) -> asyncio.Transport:
    """The transport of a connection still open; ConnectionResetError once it is gone (the
    session ends, as on any error of its connection)."""
    transport = transport_of(ws)
    if transport is None:
        raise ConnectionResetError("the WebSocket's connection is gone")
    return transport


@dataclass
class DeviceClient:
    """One device's client: reconnects whenever its connection ends, dedupes by alert_id,
    acks (unless it never acks), and misbehaves as its ``behaviour`` says while the load
    runs (drops its connection, or stops reading its socket)."""

    spec: DeviceSpec
    scene: Scene
    verifier: Verifier
    rng: random.Random
    load_over: asyncio.Event
    finish: asyncio.Event
    pause_seconds: float = 3.0
    pauses: int = 1
    closes: list[int | None] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None
    _open_fault: Fault | None = None
    _kick: asyncio.Event = field(default_factory=asyncio.Event)
    #: Seconds from each kick to the next connection_established.
    kick_reconnects: list[float] = field(default_factory=list)
    _kicked_at: float | None = None
    #: The connections of a device that holds several (behaviours in LINKED).
    links: list[Link] = field(default_factory=list)
    _links_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _turn: int = 0  # the next token of spec.token_cycle()
    _small_http: aiohttp.ClientSession | None = None  # sockets with a small SO_RCVBUF
    #: The established connection of a single-connection client (None between them), and
    #: set while there is one: what :func:`slow_reader_stalls` stops reading.
    current: aiohttp.ClientWebSocketResponse | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    #: The device's own bad-network link (run_scenario's ``netem``): every connection of
    #: the device, reconnects included, goes through it, so they share its state.
    netlink: NetLink | None = None
    #: Reconnect as an SDK does (:class:`Backoff`) and give up on a connection that has
    #: been silent for two heartbeats; None: the suite's quick reconnects.
    backoff: Backoff | None = None
    #: When this client gave up on a silent connection (dead-link detection).
    dead_links: list[float] = field(default_factory=list)
    #: The server's heartbeat_interval, from the last connection_established.
    heartbeat: float | None = None
    last_frame: float = 0.0  # when the current connection last brought a frame
    #: A close code on which the client stopped reconnecting (4009: another connection
    #: owns the device).
    stopped_by: int | None = None
    _attempt: int = 0  # reconnects since the last stable connection

    @property
    def ws_url(self) -> str:
        return self.netlink.ws_url if self.netlink is not None else self.scene.ws_url

    async def backoff_sleep(self) -> None:
        """After a failed attempt: the SDK's backoff, or the suite's short random pause."""
        if self.backoff is None:
            await asyncio.sleep(self.rng.uniform(0.05, 0.3))
            return
        delay = self.backoff.delay(self._attempt, self.rng)
        self._attempt += 1
        await first_of([self.finish], delay)

    async def after_close(self, conn: Connection, code: int | None) -> bool:
        """An SDK's reaction to a closed connection (docs/protocol.md §3, §7): wait as its
        close code says; False: do not reconnect (4009)."""
        assert self.backoff is not None
        b = self.backoff
        if conn.established is not None and conn.closed is not None:
            if conn.closed - conn.established >= b.stable:
                self._attempt = 0  # it stayed up: start again from the base delay
        if code == REPLACED:
            self.stopped_by = code
            return False
        if code == Close.TOKEN_EXPIRED:
            return True  # a new token (each connect mints one), at once
        if code == Close.GOING_AWAY:
            await first_of([self.finish], self.rng.uniform(0, b.base))  # soon, with jitter
            return True
        await self.backoff_sleep()
        return True

    def kick(self) -> bool:
        """Make the client drop its connection now and reconnect (False: it is between
        connections already)."""
        if self._open_fault is not None or self._kick.is_set():
            return False
        self._kick.set()
        return True

    def params(self, regions: Token | str = "spec") -> dict[str, str]:
        return {
            "auth_token": device_token(self.spec, regions),
            "client_id": self.spec.client_id,
            "ack_mode": self.spec.ack_mode,
            **self.spec.query(),
        }

    async def connect(
        self, regions: Token | str = "spec"
    ) -> aiohttp.ClientWebSocketResponse | None:
        params = self.params(regions)
        while not self.finish.is_set():
            try:
                async with asyncio.timeout(10):
                    assert self.http is not None
                    http = self.http
                    if self.spec.behaviour == "stalling":  # a window too small to hide a stall
                        http = self.small_window_http(STALLING_RCVBUF)
                    ws = await http.ws_connect(self.ws_url, params=params)
            except Exception:  # refused, gateway restarting, 503: reconnect with backoff
                await self.backoff_sleep()
                continue
            self.last_frame = time.monotonic()
            return ws
        return None

    async def introduce(self) -> None:
        """First contact: the device's queue starts at the live edge; subscribe its groups."""
        self.http = aiohttp.ClientSession()
        ws = await self.connect()
        assert ws is not None
        hello = await self.receive(ws, 15)
        assert hello and hello["type"] == "connection_established", hello
        self.verifier.device_created(self.spec, time.monotonic())
        if self.spec.groups:
            await ws.send_str(
                orjson.dumps({"type": "subscribe", "groups": list(self.spec.groups)}).decode()
            )
            while True:
                frame = await self.receive(ws, 15)
                assert frame is not None, "no subscription_response"
                if frame["type"] == "subscription_response":
                    assert frame["status"] == "ok", frame
                    break
        await ws.close()

    @staticmethod
    async def receive(
        ws: aiohttp.ClientWebSocketResponse,
        timeout: float,
        heard: DeviceClient | None = None,
    ) -> dict[str, Any] | None:
        """The next frame other than a ping (answered); None once the socket closed.
        ``heard``: the client whose ``last_frame`` each frame (pings too) renews."""
        while True:
            msg = await ws.receive(timeout)
            if heard is not None:
                heard.last_frame = time.monotonic()
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame: dict[str, Any] = orjson.loads(msg.data)
                if frame["type"] == "ping":
                    await ws.send_str(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
                    continue
                return frame
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
            ):
                return None
            if msg.type is aiohttp.WSMsgType.ERROR:
                return None

    @property
    def acks(self) -> bool:
        return self.spec.ack_mode == "client" and self.spec.behaviour != "never_ack"

    async def run(self) -> None:
        if self.spec.behaviour in LINKED:
            await self.run_links()
            return
        try:
            while not self.finish.is_set():
                ws = await self.connect()
                if ws is None:
                    return
                conn = self.verifier.open_connection(
                    self.spec.key, self.spec.regions, time.monotonic(), self.acks
                )
                try:
                    with contextlib.suppress(Exception):
                        await self.session(ws, conn)
                finally:
                    self.up.clear()
                    self.current = None
                self.closes.append(ws.close_code)
                with contextlib.suppress(Exception):
                    await ws.close()
                self.verifier.connection_closed(conn, time.monotonic(), ws.close_code)
                if self.backoff is not None and not self.finish.is_set():
                    if not await self.after_close(conn, ws.close_code):
                        return
        finally:
            if self.http is not None:
                await self.http.close()
            if self._small_http is not None:
                await self._small_http.close()

    async def session(self, ws: aiohttp.ClientWebSocketResponse, conn: Connection) -> None:
        key = self.spec.key
        churn = self.spec.behaviour == "churn"
        slow = self.spec.behaviour == "slow"
        ack = self.acks
        lifetime = time.monotonic() + self.rng.uniform(0.3, 1.5)
        if slow:  # a small receive window: a stopped reader backs up into the gateway
            sock = live_transport(ws).get_extra_info("socket") if ws._conn else None
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            next_pause = time.monotonic() + self.rng.uniform(0.3, 1.0)
        established = False
        sdk = self.backoff is not None
        while not self.finish.is_set():
            now = time.monotonic()
            silent = 2 * (self.heartbeat or HANDSHAKE_SECONDS / 2)
            if sdk and now - self.last_frame > silent:
                # nothing from the server for two heartbeats: the link is dead, give up on it
                self.dead_links.append(now)
                live_transport(ws).abort()
                return
            if self._kick.is_set() and established:
                self._kick.clear()
                self._open_fault = self.verifier.fault_start("reconnect_queue_node_down", now)
                self._kicked_at = now
                live_transport(ws).abort()
                return  # and reconnect at once
            if churn and established and not self.load_over.is_set() and now > lifetime:
                fault = self.verifier.fault_start("client_drop", now)
                live_transport(ws).abort()  # abrupt: no close frame
                self._open_fault = fault
                await asyncio.sleep(self.rng.uniform(0.05, 1.0))  # reconnect after a while
                return
            if slow and self.pauses > 0 and not self.load_over.is_set() and now > next_pause:
                await self.pause(ws)
                next_pause = time.monotonic() + self.rng.uniform(1.0, 4.0)
            try:
                frame = await self.receive(ws, 0.25, self if sdk else None)
            except TimeoutError:
                continue
            if frame is None:
                return
            at = time.monotonic()
            kind = frame["type"]
            if kind == "connection_established":
                established = True
                self.heartbeat = float(frame["heartbeat_interval"])
                self.current = ws
                self.up.set()
                self.verifier.connection_established(conn, at)
                self.verifier.connects[key] += 1
                if self._open_fault is not None:
                    self.verifier.fault_end(self._open_fault, at)
                    self._open_fault = None
                if self._kicked_at is not None:
                    self.kick_reconnects.append(at - self._kicked_at)
                    self._kicked_at = None
            elif kind == "backlog_truncated":
                self.verifier.record_truncated(key, frame["dropped"])
            elif kind == "alert":
                self.verifier.record_frame(key, frame, at, conn)
                if ack:
                    await ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())
                    self.verifier.record_ack(conn, frame["seq"])

    async def pause(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Stop reading the socket for a while (the kernel buffers fill up), then resume."""
        self.pauses -= 1
        transport = live_transport(ws)
        fault = self.verifier.fault_start("slow_client", time.monotonic())
        transport.pause_reading()
        try:
            await asyncio.sleep(self.pause_seconds)  # the fault itself: a stalled reader
        finally:
            with contextlib.suppress(Exception):
                transport.resume_reading()
            self.verifier.fault_end(fault, time.monotonic())

    # ------------------------------------------------------------------ several links
    def next_token(self) -> Token:
        tokens = self.spec.token_cycle()
        self._turn += 1
        return tokens[(self._turn - 1) % len(tokens)]

    async def open_link(
        self,
        regions: Token,
        acks: bool,
        role: str,
        rcvbuf: int | None = None,
        prompt: bool = True,
    ) -> Link | None:
        """One more connection of this device (others may be open): retried while refused,
        for at most ESTABLISH_SECONDS; its handshake is timed from the attempt that worked
        and, if ``prompt``, must take at most TAKEOVER_SECONDS."""
        assert self.http is not None
        acks = acks and self.spec.ack_mode == "client"
        deadline = time.monotonic() + ESTABLISH_SECONDS
        while not self.finish.is_set() and time.monotonic() < deadline:
            opened = time.monotonic()
            http = self.http if rcvbuf is None else self.small_window_http(rcvbuf)
            try:
                async with asyncio.timeout(10):
                    ws = await http.ws_connect(self.ws_url, params=self.params(regions))
            except Exception:  # refused, a gateway restarting: again, with backoff
                await self.backoff_sleep()
                continue
            conn = self.verifier.open_connection(self.spec.key, regions, opened, acks, role, prompt)
            link = Link(self, ws, conn)
            self.links.append(link)
            link.task = asyncio.create_task(link.pump())
            return link
        return None

    def small_window_http(self, rcvbuf: int) -> aiohttp.ClientSession:
        """A client session whose sockets get SO_RCVBUF = ``rcvbuf`` before they connect, so
        the window negotiated in the handshake is small too (set afterwards, the kernel
        keeps honouring the window it already advertised)."""
        if self._small_http is None:
            connector = aiohttp.TCPConnector(socket_factory=small_window(rcvbuf), force_close=True)
            self._small_http = aiohttp.ClientSession(connector=connector)
        return self._small_http

    def open_links(self) -> list[Link]:
        return [link for link in self.links if link.open]

    async def drop_links(self, clean: bool) -> None:
        """End every connection of the device: closed (a close frame) or aborted (none)."""
        for link in list(self.links):
            if link.stalled or not clean:
                link.abort()
            else:
                await link.close()
        tasks = [link.task for link in self.links if link.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        self.links = []

    async def ensure_link(self) -> None:
        """The device keeps one connection: open one if none is open (and read). A
        never-acking connection that is left alone starts acking (it was never-acking for
        the overlap; alone it would starve the device once its window is full)."""
        alive = self.open_links()
        if len(alive) == 1 and self.acks:
            alive[0].conn.acks = True
        if alive or self.finish.is_set():
            return
        link = await self.open_link(self.next_token(), self.acks, "reconnect")
        if link is not None:
            await first_of([link.established, link.ended], ESTABLISH_SECONDS)

    async def settle(self, links: list[Link]) -> list[Link]:
        """Wait (SETTLE_SECONDS at most) until at most one of ``links`` is still open: the
        server closes the others (4009). Returns those still open."""
        deadline = time.monotonic() + SETTLE_SECONDS
        for _ in range(len(links) + 1):  # each round one closes, or the deadline passes
            still = [link for link in links if link.open]
            left = deadline - time.monotonic()
            if len(still) <= 1 or left <= 0:
                break
            await first_of([link.ended for link in still], left)
        return [link for link in links if link.open]

    async def run_links(self) -> None:
        """A device that holds several connections: its injector opens and drops them; this
        loop only reconnects when none is open (e.g. every one was closed by the server)."""
        try:
            while not self.finish.is_set():
                async with self._links_lock:
                    self.links = [link for link in self.links if link.open or link.stalled]
                    await self.ensure_link()
                ends = [link.ended for link in self.open_links()]
                await first_of([*ends, self.finish], 0.5)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.drop_links(clean=True), 15)
            for link in self.links:
                if link.task is not None:
                    link.task.cancel()
            if self.http is not None:
                await self.http.close()
            if self._small_http is not None:
                await self._small_http.close()

    async def concurrent_cycle(self, kind: str, tokens: list[Token]) -> None:
        """Away for a moment (a backlog builds up), then ``len(tokens)`` connections at the
        same instant, some acking, some never acking. Exactly one may survive."""
        v, rng = self.verifier, self.rng
        async with self._links_lock:
            await self.drop_links(clean=rng.random() < 0.5)
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # away: a backlog builds up
            at = time.monotonic()
            fault = v.fault_start(kind, at)
            acks = [True] + [rng.random() < 0.5 for _ in tokens[1:]]
            rng.shuffle(acks)
            opened = await asyncio.gather(
                *(
                    self.open_link(t, a, kind, prompt=False)
                    for t, a in zip(tokens, acks, strict=True)
                )
            )
            links = [link for link in opened if link is not None]
            survivors = await self.settle(links)
            v.record_overlap(
                Overlap(
                    kind,
                    self.spec.key,
                    [link.conn.id for link in links],
                    at,
                    survivors=[link.conn.id for link in survivors],
                    settled=time.monotonic(),
                )
            )
            await self.ensure_link()  # none survived: reconnect
            v.fault_end(fault, time.monotonic())

    async def overlap_cycle(self, kind: str, regions: Token) -> None:
        """A new connection (e.g. with a refreshed token) while the old one is still open:
        the new one must replace it promptly (the old one closed with 4009)."""
        v = self.verifier
        async with self._links_lock:
            await self.ensure_link()
            old = self.open_links()
            for link in old:
                await first_of([link.established, link.ended], ESTABLISH_SECONDS)
            at = time.monotonic()
            fault = v.fault_start(kind, at)
            new = await self.open_link(regions, self.acks, kind)
            if new is not None:
                await first_of([new.established, new.ended], ESTABLISH_SECONDS)
                survivors = await self.settle([*old, new])
                v.record_overlap(
                    Overlap(
                        kind,
                        self.spec.key,
                        [link.conn.id for link in [*old, new]],
                        at,
                        survivors=[link.conn.id for link in survivors],
                        settled=time.monotonic(),
                        winner=new.conn.id,
                    )
                )
            await self.ensure_link()
            v.fault_end(fault, time.monotonic())

    async def sequential_cycle(self, regions: Token) -> None:
        """Drop the connection, away for a moment, connect again with ``regions``."""
        rng = self.rng
        async with self._links_lock:
            fault = self.verifier.fault_start("token_sequential", time.monotonic())
            await self.drop_links(clean=rng.random() < 0.5)
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # away: a backlog builds up
            link = await self.open_link(regions, self.acks, "token_sequential")
            if link is not None:
                await first_of([link.established, link.ended], ESTABLISH_SECONDS)
            await self.ensure_link()
            self.verifier.fault_end(fault, time.monotonic())

    async def stall_cycle(self, variant: str, stall_seconds: float) -> None:
        """A fresh connection with a small SO_RCVBUF reads for a while, then stops reading
        for good (``stall_seconds``, longer than two heartbeats). ``variant``:
        ``takeover``: a new connection opens while the stalled one is still open (it must be
        established within TAKEOVER_SECONDS); ``takeover_restart``: the same, and moments
        after the stalled one is abandoned the app restarts its socket (closes the new one,
        which kept receiving and acking, and connects again: a stalled session that saves
        its old position late shows here); ``wait``: no new connection until the stall is
        over (the server should have dropped the stalled one). The stalled connection is
        abandoned (its transport aborted) when the stall is over."""
        v, rng, key = self.verifier, self.rng, self.spec.key
        async with self._links_lock:
            await self.drop_links(clean=True)
            regions = self.next_token()
            link = await self.open_link(regions, self.acks, "stalled", rcvbuf=4096)
            if link is None:
                return
            await first_of([link.established, link.ended], ESTABLISH_SECONDS)
            await asyncio.sleep(rng.uniform(0.3, 0.8))  # reads normally for a while
            stalled_at = time.monotonic()
            fault = v.fault_start("stalled_reader", stalled_at)
            await link.stall()
            # A burst of large alerts for the stalled reader's region: more than the kernel
            # buffers hold (a loopback send buffer grows to 4 MB), so the server's writes to
            # the stalled socket block, as they do on a real network within far less.
            burst = asyncio.ensure_future(self._burst())
            if variant == "wait":
                await asyncio.sleep(stall_seconds)  # the fault: a reader that stopped
                await asyncio.wait([burst], timeout=30)
                link.abort()
                await self._after_stall(link, regions, "after_stall")
            else:
                # the new connection comes while the stalled one is surely still open on the
                # server: well before two heartbeats (stall_seconds is 2.5 of them)
                takeover_at = stalled_at + stall_seconds * 0.5
                await asyncio.wait([burst], timeout=max(0.0, takeover_at - time.monotonic()))
                await asyncio.sleep(max(0.0, takeover_at - time.monotonic()))  # the fault
                new = await self.open_link(regions, self.acks, "stalled_takeover")
                if new is not None:
                    await first_of([new.established, new.ended], ESTABLISH_SECONDS)
                    v.record_overlap(
                        Overlap(
                            "stalled_takeover",
                            key,
                            [link.conn.id, new.conn.id],
                            stalled_at,
                            survivors=[new.conn.id] if new.open else [],
                            winner=new.conn.id,
                        )
                    )
                rest = stalled_at + stall_seconds - time.monotonic()
                if rest > 0:
                    await asyncio.sleep(rest)  # the fault: it stays stalled meanwhile
                await asyncio.wait([burst], timeout=30)
                link.abort()
                if variant == "takeover_restart" and new is not None:
                    # moments later the app restarts its socket: the new connection, which
                    # kept receiving and acking, closes and a third one connects
                    await asyncio.sleep(rng.uniform(0.2, 0.6))
                    await new.close()
                    await self._after_stall(link, regions, "restart_after_stall")
            self.links = [x for x in self.links if x is not link]
            await self.ensure_link()
            v.fault_end(fault, time.monotonic())

    async def _burst(self) -> None:
        if self.scene.engine is not None:
            await self.scene.engine.burst(BURST_ALERTS, BURST_REGION)

    async def _after_stall(self, stalled: Link, regions: Token, kind: str) -> None:
        """Connect again right after abandoning a stalled connection: promptly established."""
        new = await self.open_link(regions, self.acks, kind)
        if new is None:
            return
        await first_of([new.established, new.ended], ESTABLISH_SECONDS)
        self.verifier.record_overlap(
            Overlap(
                kind,
                self.spec.key,
                [stalled.conn.id, new.conn.id],
                new.conn.opened,
                survivors=[new.conn.id] if new.open else [],
                winner=new.conn.id,
            )
        )


#: Behaviours whose client holds several connections (Link), driven by an injector.
LINKED = ("concurrent", "token_change", "stalled")
#: How long a client waits for the server to close all but one of a device's overlapping
#: connections (the settle time of an Overlap).
SETTLE_SECONDS = 3.0
#: Deadline for one connection's connection_established (or its end).
ESTABLISH_SECONDS = 15.0
#: An SDK client gives up on a new connection that brought no frame for this long (before
#: connection_established tells it the heartbeat).
HANDSHAKE_SECONDS = 20.0


@dataclass(frozen=True)
class Backoff:
    """How an SDK reconnects (docs/protocol.md §7): after a failed attempt or a dropped
    connection, a delay drawn from [0, min(cap, base * 2^n)] (full jitter; n counts the
    attempts since the last connection that stayed up ``stable`` seconds); 1001 soon (within
    ``base``), 4401 at once with a new token, 4009 never (another connection owns the
    device)."""

    base: float
    cap: float
    stable: float

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.base * 2 ** min(attempt, 30)))


#: A stalled reader's burst: 130 alerts of ~30 KB (3.9 MB) for a region only the stalled
#: devices' tokens (and admin) hold.
BURST_ALERTS = 130
BURST_REGION = "TZ-01"


async def first_of(events: list[asyncio.Event], timeout: float) -> None:
    """Wait until one of ``events`` is set, at most ``timeout`` seconds."""
    if not events or timeout <= 0:
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


@dataclass
class Link:
    """One of several connections a device's client holds: its socket, its verifier record
    (the token it used), the task reading it (answering pings, recording every frame, acking
    if it is an acking one)."""

    client: DeviceClient
    ws: aiohttp.ClientWebSocketResponse
    conn: Connection
    established: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: bool = False  # nothing read any more; still open as far as the server knows
    task: asyncio.Task[None] | None = None

    @property
    def open(self) -> bool:
        """Open and read (a stalled link is open but unread)."""
        return not self.ended.is_set()

    async def pump(self) -> None:
        client, v = self.client, self.client.verifier
        key = client.spec.key
        try:
            while not client.finish.is_set():
                try:
                    frame = await client.receive(self.ws, 0.25)
                except TimeoutError:
                    continue
                if frame is None:
                    break
                at = time.monotonic()
                kind = frame["type"]
                if kind == "connection_established":
                    v.connection_established(self.conn, at)
                    v.connects[key] += 1
                    self.established.set()
                elif kind == "backlog_truncated":
                    v.record_truncated(key, frame["dropped"])
                elif kind == "alert":
                    v.record_frame(key, frame, at, self.conn)
                    if self.conn.acks:
                        ack = orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode()
                        await self.ws.send_str(ack)
                        v.record_ack(self.conn, frame["seq"])
        except Exception:  # the socket failed: the link ends
            pass
        finally:
            if not self.stalled:
                v.connection_closed(self.conn, time.monotonic(), self.ws.close_code)
            self.ended.set()

    async def stall(self) -> None:
        """Stop reading the socket for good: its kernel buffers fill, the server's writes
        back up. Nothing more is read, not even pings."""
        self.stalled = True
        transport = transport_of(self.ws)
        if transport is not None:
            transport.pause_reading()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def abort(self) -> None:
        """Abandon it: no close frame, the TCP connection reset."""
        transport = transport_of(self.ws)
        if transport is not None:
            transport.abort()
        self.client.verifier.connection_closed(self.conn, time.monotonic(), None)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5)
        if self.task is not None:
            await asyncio.wait([self.task], timeout=5)
        self.client.verifier.connection_closed(self.conn, time.monotonic(), self.ws.close_code)


# ----------------------------------------------------------------------- a scenario

Injector = Callable[[Scene, Verifier, random.Random, asyncio.Event], Awaitable[None]]


@dataclass
class Outcome:
    report: Report
    verifier: Verifier
    clients: list[DeviceClient]


async def run_scenario(
    name: str,
    tmp: Path,
    specs: list[DeviceSpec],
    injectors: list[Injector],
    gateways: int = 1,
    use_proxy: bool = False,
    seed: int | None = None,
    pause_seconds: float = 3.0,
    cluster: bool = False,
    mode: Mode | None = None,
    load_after_faults: float | None = None,
    overrides: dict[str, Any] | None = None,
    large: float = 0.0,
    netem: Profile | None = None,
    backoff: Backoff | None = None,
) -> Outcome:
    """``load_after_faults``: the load lasts until every injector returned and this many
    seconds more (else ``mode.load_seconds``, the injectors running alongside). ``netem``:
    each device talks through its own bad-network link with this profile (its outages run
    when :func:`link_outages` says); ``backoff``: the devices reconnect as an SDK does."""
    mode = mode or MODE
    seed = seed if seed is not None else int(os.environ.get("TOCSIN_CHAOS_SEED", time.time_ns()))
    seed %= 1_000_000
    rng = random.Random(seed)
    verifier = Verifier(f"{name}")
    scene = Scene(
        tmp, gateways=gateways, use_proxy=use_proxy, cluster=cluster, overrides=overrides or {}
    )
    load_over, finish = asyncio.Event(), asyncio.Event()
    clients = [
        DeviceClient(
            s,
            scene,
            verifier,
            random.Random(rng.random()),
            load_over,
            finish,
            pause_seconds=pause_seconds,
            pauses=mode.faults,
            backoff=backoff,
        )
        for s in specs
    ]
    scene.clients = clients
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        await scene.start()
        if netem is not None:
            for c in clients:
                link = NetLink([scene.upstream], netem, rng=random.Random(rng.random()))
                c.netlink = await link.start()
        await asyncio.gather(*(c.introduce() for c in clients))
        for c in clients:
            if c.spec.behaviour == "never_ack":
                verifier.fault_start("never_ack", time.monotonic())
        tasks = [asyncio.create_task(c.run()) for c in clients]
        engine = scene.engine = Engine(scene, verifier, random.Random(rng.random()), large=large)
        load_started = time.monotonic()
        faults_over = asyncio.Event()

        async def faults() -> None:
            try:
                await asyncio.gather(*(inj(scene, verifier, rng, load_over) for inj in injectors))
            finally:
                faults_over.set()

        if load_after_faults is None:
            await asyncio.gather(engine.run(mode), faults())
        else:
            cap = mode.load_seconds + mode.timeout
            await asyncio.gather(engine.run(mode, faults_over, load_after_faults, cap), faults())
        load_over.set()
        verifier.end_phase(time.monotonic())
        for fault in verifier.faults:
            if fault.kind == "never_ack" and fault.end is None:
                verifier.fault_end(fault, time.monotonic())
        load_seconds = time.monotonic() - load_started
        deadline = time.monotonic() + mode.drain_seconds
        laggards = [k for k, d in verifier.devices.items() if d.behaviour == "never_ack"]

        def drained() -> bool:  # and what never-ack devices hold unacked has come again
            resent = all(any(r.redelivered for r in verifier.receipts[k]) for k in laggards)
            return resent and verifier.all_received()

        reconnected: set[str] = set()
        while not drained() and time.monotonic() < deadline:
            # Nothing is resent on an open connection: what a never-acking device holds
            # comes again on its next one. Once it has everything, it reconnects.
            for c in clients:
                key = c.spec.key
                if key in laggards and key not in reconnected and not verifier.missing(key):
                    if c.kick():
                        reconnected.add(key)
            await asyncio.sleep(0.1)  # polling a condition with a deadline
        finish.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        report = verifier.report(await scene.stream_seqs())
        report.mode, report.seconds = mode.name, load_seconds
        report.publish_retries = engine.retries
        if cluster:
            report.queues_rebuilt = scene.queues_rebuilt()
        kicked = sorted(round(s, 1) for c in clients for s in c.kick_reconnects)
        if kicked:
            report.examples.append(f"reconnects while the queue's node was down: {kicked} s")
        steady = {k for k, s in verifier.devices.items() if s.behaviour == "steady"}
        if len(steady) < len(verifier.devices):
            report.bystander_worst_delay = verifier.worst_delay_of(steady)
        report.examples.insert(0, f"seed {seed}, whole scenario {time.monotonic() - started:.1f} s")
    finally:
        finish.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await scene.stop()
    print(f"\nchaos scenario {name}\n{report.table()}")
    path = os.environ.get("TOCSIN_CHAOS_REPORT")
    if path:
        report.append_jsonl(path)
    return Outcome(report, verifier, clients)


# ----------------------------------------------------------------------- faults


def link_outages(seconds: float) -> Injector:
    """Every device's bad-network link runs its profile's outages (each link its own, at
    random) for ``seconds``; one under way then runs to its end. Each outage becomes a
    fault of the verifier, by its kind (stall, blackhole, cut)."""

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        links = [c.netlink for c in scene.clients if c.netlink is not None]
        stop = asyncio.Event()
        runs = [asyncio.ensure_future(link.run_outages(stop)) for link in links]
        try:
            await asyncio.sleep(seconds)  # the faults' span
        finally:
            stop.set()
            await asyncio.gather(*runs, return_exceptions=True)
            for link in links:
                v.faults.extend(Fault(o.kind, o.start, o.end) for o in link.outages)

    return inject


async def spaced(rng: random.Random, n: int, load_over: asyncio.Event) -> None:
    """Wait a random part of the load's next 1/(n+1) share (load shaping)."""
    await asyncio.sleep(rng.uniform(0.5, 1.5) * MODE.load_seconds / (n + 1))


def gateway_kills(n: int) -> Injector:
    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        for _ in range(n):
            await spaced(rng, n, over)
            gw = rng.choice(scene.gws)
            fault = v.fault_start("gateway_kill", time.monotonic())
            gw.kill()  # kill -9 mid-send: alerts are flowing
            await asyncio.sleep(rng.uniform(0.2, 1.0))  # downtime
            gw.start()  # same port
            await asyncio.to_thread(gw.wait_up)
            v.fault_end(fault, time.monotonic())

    return inject


def ingest_kills(n: int) -> Injector:
    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        for _ in range(n):
            await spaced(rng, n, over)
            fault = v.fault_start("ingest_kill", time.monotonic())
            scene.kill_ingest()  # events wait in INGEST meanwhile
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            scene.start_ingest()
            v.fault_end(fault, time.monotonic())

    return inject


def nats_restarts(n: int) -> Injector:
    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        for _ in range(n):
            await spaced(rng, n, over)
            fault = v.fault_start("nats_restart", time.monotonic())
            await scene.restart_nats()
            v.fault_end(fault, time.monotonic())

    return inject


async def pick_node(scene: Scene, rng: random.Random, alive: list[int]) -> tuple[int, list[str]]:
    """The live node to kill: the one holding the most device queues and stream leaders (so
    the queue rebuild and the re-elections are exercised). Also: the devices whose queue
    it holds."""
    n = scene.names
    hosts, leaders = await asyncio.gather(scene.queue_hosts(), scene.leaders())
    weight = {n.alerts_stream: 3, n.ingest_stream: 3, n.devices_stream: 2}
    score = dict.fromkeys(alive, 0.0)
    for node in hosts.values():
        if node in score:
            score[node] += 1
    for stream, node in leaders.items():
        if node in score:
            score[node] += weight.get(stream, 1)
    for node in score:
        score[node] += rng.random() / 10  # ties: at random
    node = max(score, key=lambda i: score[i])
    return node, [key for key, n in hosts.items() if n == node]


def kick(scene: Scene, keys: list[str], rng: random.Random, most: int) -> int:
    """Make up to ``most`` of these devices reconnect (their queue's node is down). Only
    devices that ack: a kick abandons the socket with whatever the gateway wrote to it
    unread, which for ack_mode=auto counts as delivered (the contract; reliability.md §5:
    such devices never drop their own connections in the suite)."""
    chosen = [
        c
        for c in scene.clients
        if c.spec.key in keys
        and c.spec.behaviour in ("steady", "churn")
        and c.spec.ack_mode == "client"
    ]
    rng.shuffle(chosen)
    return sum(c.kick() for c in chosen[:most])


def node_kills(
    cycles: int, second: bool, lead: float, one_down: float, two_down: float
) -> Injector:
    """On a cluster: after ``lead`` seconds of load, ``kill -9`` the node with the most
    device queues and stream leaders and make some of its devices reconnect (their queue is
    rebuilt elsewhere); ``one_down`` seconds later either bring it back or, with ``second``,
    kill another (the streams lose their quorum: no PubAck until a node returns), kick a
    device of that one too, and bring both back (same store) ``two_down`` seconds later.
    Durations vary by ±20 %; the phases (all_up, one_down, two_down, returning: restarting
    until every node is healthy, healed) are marked on the verifier. ``cycles`` times while
    the load's ``MODE.load_seconds`` last (at least once)."""

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        assert scene.nodes is not None
        cluster = scene.nodes
        began = time.monotonic()
        for cycle in range(cycles):
            if cycle and time.monotonic() - began > MODE.load_seconds - lead:
                break
            v.phase("all_up" if cycle == 0 else "healed", time.monotonic())
            await asyncio.sleep(lead * rng.uniform(0.8, 1.2))  # load before the fault
            first, keys = await pick_node(scene, rng, [0, 1, 2])
            now = time.monotonic()
            v.phase("one_down", now)
            kills = [(first, v.fault_start("node_kill", now))]
            cluster.kill(first)
            kick(scene, keys, rng, 3)
            await asyncio.sleep(one_down * rng.uniform(0.8, 1.2))  # the fault's length
            quorum = None
            if second:
                alive = [i for i in range(3) if i != first]
                other, keys = await pick_node(scene, rng, alive)
                now = time.monotonic()
                v.phase("two_down", now)
                quorum = v.fault_start("quorum_loss", now)
                kills.append((other, v.fault_start("node_kill", now)))
                cluster.kill(other)
                kick(scene, keys, rng, 1)
                await asyncio.sleep(two_down * rng.uniform(0.8, 1.2))
            v.phase("returning", time.monotonic())  # restarting until healthy
            for node, _ in kills:
                await asyncio.to_thread(cluster.start_node, node, 30)  # same port and store
                if quorum is not None:  # two of three up: a quorum is possible again
                    v.fault_end(quorum, time.monotonic())
                    quorum = None
            await asyncio.to_thread(cluster.wait_healthy, 60)
            now = time.monotonic()
            v.phase("healed", now)
            for _, fault in kills:
                v.fault_end(fault, now)

    return inject


# ----------------------------------------------------------------------- slow readers

#: The SO_RCVBUF of a ``stalling`` device's sockets, set before they connect (so the
#: window they advertise is small: set afterwards, the kernel keeps the one it advertised).
STALLING_RCVBUF = 4096
#: The burst behind a stalled reader: 7.8 MB, twice what a loopback send buffer holds (it
#: grows to ~3.9 MB), so the gateway's writer for it waits on the socket before the probes,
#: which come after the burst in the stream, reach anyone.
STALL_BURST_ALERTS = 2 * BURST_ALERTS
#: Deadline for every bystander to get its probes while readers are stalled: a bound on a
#: condition that holds unless the stall holds the others up (or delivery is broken).
PROBE_SECONDS = 30.0
#: Random alerts tried for a probe a bystander's filters select.
PROBE_TRIES = 1000


def slow_reader_stalls(n: int, pause_seconds: float) -> Injector:
    """``n`` times: every ``stalling`` device's client stops reading its socket (opened with
    a small receive window); a burst of large alerts for their region (STALL_BURST_ALERTS,
    more than the loopback buffers hold) backs their sessions up in the gateway, so its
    writes to them block; then probe alerts for the bystanders (``steady`` devices), for
    each one its filters select, in two waves (the second once the first arrived). The
    readers stay stalled ``pause_seconds`` and until every bystander got its probes
    (PROBE_SECONDS at most; the scenario's heartbeat must be longer, or the gateway drops
    the stalled sessions first), then read on. Whether the probes came while the readers
    were stalled is the verifier's (:class:`Stall`)."""

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        stalling = clients_with(scene, "stalling")
        bystanders = [c.spec for c in clients_with(scene, "steady")]
        assert scene.engine is not None
        for _ in range(n):
            await spaced(rng, n, over)
            for c in stalling:  # each client is connected, or reconnecting at once
                await first_of([c.up, c.finish], ESTABLISH_SECONDS)
            held: list[tuple[DeviceClient, asyncio.Transport]] = []
            for c in stalling:
                transport = None if c.current is None else transport_of(c.current)
                if transport is not None:
                    held.append((c, transport))
            now = time.monotonic()
            fault = v.fault_start("slow_client", now)
            stall = Stall([c.spec.key for c, _ in held], now)
            v.stalls.append(stall)
            for _, transport in held:
                transport.pause_reading()
            try:
                await scene.engine.burst(STALL_BURST_ALERTS, BURST_REGION)
                deadline = time.monotonic() + PROBE_SECONDS
                # Two waves. The gateway hands the burst and the first wave to the sessions'
                # writers at once; once the first wave has arrived, the stalled session's
                # writer has run and is waiting on its full socket, so the second wave is
                # what a writer that blocks others would hold up.
                for _ in range(2):
                    wave = await scene.engine.probes(bystanders)
                    for key, ids in wave.items():
                        stall.probes.setdefault(key, set()).update(ids)
                    while not v.probes_delivered(stall) and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)  # polling a condition with a deadline
                rest = stall.start + pause_seconds - time.monotonic()
                if rest > 0:
                    await asyncio.sleep(rest)  # the fault itself: how long the readers stall
            finally:
                stall.end = time.monotonic()
                for _, transport in held:
                    with contextlib.suppress(Exception):
                        transport.resume_reading()
                v.fault_end(fault, stall.end)

    return inject


# ----------------------------------------------------------------------- overlapping connections


def clients_with(scene: Scene, behaviour: str) -> list[DeviceClient]:
    return [c for c in scene.clients if c.spec.behaviour == behaviour]


def concurrent_connects(n: int) -> Injector:
    """``n`` times per ``concurrent`` device: away for a moment, then 2 or 3 connections at
    the same instant (asyncio.gather of ws_connect), some acking, some never acking."""

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        async def cycles(i: int, c: DeviceClient) -> None:
            for k in range(n):
                await spaced(c.rng, n, over)
                count = 2 + (i + k) % 2
                await c.concurrent_cycle("concurrent_connect", [c.spec.regions] * count)

        await asyncio.gather(
            *(cycles(i, c) for i, c in enumerate(clients_with(scene, "concurrent")))
        )

    return inject


def token_changes(n: int) -> Injector:
    """``n`` token changes per ``token_change`` device, its tokens in turn
    (``DeviceSpec.tokens``, e.g. ``KE,UG`` then ``KE``), by turns: ``concurrent`` (two
    connections with different tokens at the same instant: twice per round, the race is
    not lost every time), ``overlap`` (a new connection with the next token while the old
    one is open: a token refresh) and ``sequential`` (drop, away for a moment, connect
    with the next token)."""
    modes = ("concurrent", "overlap", "concurrent", "sequential")

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        async def cycles(i: int, c: DeviceClient) -> None:
            for k in range(n):
                await spaced(c.rng, n, over)
                mode = modes[(i + k) % len(modes)]
                if mode == "overlap":
                    await c.overlap_cycle("token_overlap", c.next_token())
                elif mode == "concurrent":
                    tokens = [c.next_token(), c.next_token()]
                    await c.concurrent_cycle("token_concurrent", tokens)
                else:
                    await c.sequential_cycle(c.next_token())

        clients = clients_with(scene, "token_change")
        await asyncio.gather(*(cycles(i, c) for i, c in enumerate(clients)))

    return inject


def stalled_readers(n: int, stall_seconds: float) -> Injector:
    """``n`` stalls per ``stalled`` device (``DeviceClient.stall_cycle``), by turns with a
    takeover and a restart, without a new connection until the stall is over, and with a
    takeover only. Each stall lasts ``stall_seconds`` to 1.3 times that."""
    variants = ("takeover_restart", "wait", "takeover")

    async def inject(scene: Scene, v: Verifier, rng: random.Random, over: asyncio.Event) -> None:
        async def cycles(i: int, c: DeviceClient) -> None:
            for k in range(n):
                await spaced(c.rng, n, over)
                variant = variants[(i + k) % len(variants)]
                await c.stall_cycle(variant, stall_seconds * c.rng.uniform(1.0, 1.3))

        await asyncio.gather(*(cycles(i, c) for i, c in enumerate(clients_with(scene, "stalled"))))

    return inject
