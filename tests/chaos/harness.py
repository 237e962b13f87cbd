"""The chaos harness: real processes on loopback, an engine, devices, a fault schedule.

A :class:`Scene` owns one nats-server (file storage, restartable) or, with ``cluster=True``,
a 3-node :class:`~tocsin.core.embedded.NatsCluster` (streams R3, device queues R1; every
process gets all three URLs), one ingest process and
N gateway processes (each keeps its port across ``kill -9`` and restart), optionally behind
a :class:`~tests.chaos.proxy.RoundRobinProxy`. The :class:`Engine` publishes to the ingest
subject through JetStream (``Nats-Msg-Id`` = alert_id) and records each PubAck'ed alert;
each :class:`DeviceClient` records every frame. Waiting is on conditions with deadlines;
random sleeps only shape the load (churn delays, downtimes).
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

from tocsin.core.auth import mint_token
from tocsin.core.embedded import (
    NatsCluster,
    NatsServer,
    free_port,
    stop_process,
)
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from ..conftest import SECRET
from ..support import GatewayProcess, settings_env, spawn_tocsin
from .proxy import RoundRobinProxy
from .verifier import DeviceSpec, Fault, Report, Verifier

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

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def ws_url(self) -> str:
        return self.proxy.ws_url if self.proxy is not None else self.gws[0].ws_url

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
        )
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
                seqs[orjson.loads(msg.data)["alert_id"]] = seq
        return seqs

    async def stop(self) -> None:
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


def make_alert(rng: random.Random) -> dict[str, Any]:
    _ids[0] += 1
    location: dict[str, Any] = {"region": rng.choice(REGIONS)}
    if rng.random() < 0.6:
        location["lat"] = round(rng.uniform(-3, 3), 4)
        location["lon"] = round(rng.uniform(30, 38), 4)
    body: dict[str, Any] = {
        "alert_id": _ids[0],
        "alert_level": rng.choice(LEVELS),
        "alert_type": rng.choice(TYPES),
        "title": "Chaos alert",
        "message": "Risk model predicts a rise in cases. " * 8,
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
            await self.publish(make_alert(self.rng), now + 90)
            due = start + (n + 1) / mode.rate  # pacing: load shaping, not synchronisation
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())


# ----------------------------------------------------------------------- devices


def device_token(spec: DeviceSpec) -> str:
    if spec.regions is None:
        return mint_token(SECRET, spec.user, roles=("admin",), regions=())
    return mint_token(SECRET, spec.user, regions=spec.regions)


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

    def kick(self) -> bool:
        """Make the client drop its connection now and reconnect (False: it is between
        connections already)."""
        if self._open_fault is not None or self._kick.is_set():
            return False
        self._kick.set()
        return True

    async def connect(self) -> aiohttp.ClientWebSocketResponse | None:
        params = {
            "auth_token": device_token(self.spec),
            "client_id": self.spec.client_id,
            "ack_mode": self.spec.ack_mode,
            **self.spec.query(),
        }
        while not self.finish.is_set():
            try:
                async with asyncio.timeout(10):
                    assert self.http is not None
                    ws = await self.http.ws_connect(self.scene.ws_url, params=params)
            except Exception:  # refused, gateway restarting, 503: reconnect with backoff
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                continue
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
    async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float) -> dict[str, Any] | None:
        while True:
            msg = await ws.receive(timeout)
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame: dict[str, Any] = orjson.loads(msg.data)
                if frame["type"] == "ping":
                    await ws.send_str(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
                    continue
                return frame
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                return None
            if msg.type is aiohttp.WSMsgType.ERROR:
                return None

    async def run(self) -> None:
        try:
            while not self.finish.is_set():
                ws = await self.connect()
                if ws is None:
                    return
                with contextlib.suppress(Exception):
                    await self.session(ws)
                self.closes.append(ws.close_code)
                with contextlib.suppress(Exception):
                    await ws.close()
        finally:
            if self.http is not None:
                await self.http.close()

    async def session(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        key = self.spec.key
        churn = self.spec.behaviour == "churn"
        slow = self.spec.behaviour == "slow"
        ack = self.spec.ack_mode == "client" and self.spec.behaviour != "never_ack"
        lifetime = time.monotonic() + self.rng.uniform(0.3, 1.5)
        if slow:  # a small receive window: a stopped reader backs up into the gateway
            sock = ws._conn.transport.get_extra_info("socket") if ws._conn else None  # type: ignore[union-attr]
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            next_pause = time.monotonic() + self.rng.uniform(0.3, 1.0)
        established = False
        while not self.finish.is_set():
            now = time.monotonic()
            if self._kick.is_set() and established:
                self._kick.clear()
                self._open_fault = self.verifier.fault_start("reconnect_queue_node_down", now)
                self._kicked_at = now
                ws._conn.transport.abort()  # type: ignore[union-attr]
                return  # and reconnect at once
            if churn and established and not self.load_over.is_set() and now > lifetime:
                fault = self.verifier.fault_start("client_drop", now)
                ws._conn.transport.abort()  # type: ignore[union-attr]  # abrupt: no close frame
                self._open_fault = fault
                await asyncio.sleep(self.rng.uniform(0.05, 1.0))  # reconnect after a while
                return
            if slow and self.pauses > 0 and not self.load_over.is_set() and now > next_pause:
                await self.pause(ws)
                next_pause = time.monotonic() + self.rng.uniform(1.0, 4.0)
            try:
                frame = await self.receive(ws, 0.25)
            except TimeoutError:
                continue
            if frame is None:
                return
            at = time.monotonic()
            kind = frame["type"]
            if kind == "connection_established":
                established = True
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
                self.verifier.record_frame(key, frame, at)
                if ack:
                    await ws.send_str(orjson.dumps({"type": "ack", "seq": frame["seq"]}).decode())

    async def pause(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Stop reading the socket for a while (the kernel buffers fill up), then resume."""
        self.pauses -= 1
        transport = ws._conn.transport  # type: ignore[union-attr]
        fault = self.verifier.fault_start("slow_client", time.monotonic())
        transport.pause_reading()
        try:
            await asyncio.sleep(self.pause_seconds)  # the fault itself: a stalled reader
        finally:
            with contextlib.suppress(Exception):
                transport.resume_reading()
            self.verifier.fault_end(fault, time.monotonic())


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
) -> Outcome:
    """``load_after_faults``: the load lasts until every injector returned and this many
    seconds more (else ``mode.load_seconds``, the injectors running alongside)."""
    mode = mode or MODE
    seed = seed if seed is not None else int(os.environ.get("TOCSIN_CHAOS_SEED", time.time_ns()))
    seed %= 1_000_000
    rng = random.Random(seed)
    verifier = Verifier(f"{name}")
    scene = Scene(tmp, gateways=gateways, use_proxy=use_proxy, cluster=cluster)
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
        )
        for s in specs
    ]
    scene.clients = clients
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        await scene.start()
        await asyncio.gather(*(c.introduce() for c in clients))
        for c in clients:
            if c.spec.behaviour == "never_ack":
                verifier.fault_start("never_ack", time.monotonic())
        tasks = [asyncio.create_task(c.run()) for c in clients]
        engine = Engine(scene, verifier, random.Random(rng.random()))
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

        while not drained() and time.monotonic() < deadline:
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
    """Make up to ``most`` of these devices reconnect (their queue's node is down)."""
    chosen = [
        c for c in scene.clients if c.spec.key in keys and c.spec.behaviour in ("steady", "churn")
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
