"""The chaos harness: real processes on loopback, an engine, devices, a fault schedule.

A :class:`Scene` owns one nats-server (file storage, restartable), one ingest process and
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
import sys
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
from tocsin.core.embedded import NatsServer, free_port, stop_process, wait_for_port
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from ..conftest import SECRET
from ..support import settings_env
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


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tocsin", *args],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


@dataclass
class Gateway:
    port: int
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = spawn(["gateway"], self.env | {"TOCSIN_HTTP_PORT": str(self.port)}, self.log)

    async def wait_up(self, timeout: float = 30) -> None:
        try:
            await asyncio.to_thread(wait_for_port, "127.0.0.1", self.port, timeout, self.proc)
        except (TimeoutError, RuntimeError) as exc:
            why = f"gateway :{self.port} did not start ({exc}):\n{tail(self.log)}"
            raise AssertionError(why) from None

    def kill(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 15)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/alerts/ws"


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Scene:
    tmp: Path
    gateways: int = 1
    use_proxy: bool = False
    namespace: str = field(default_factory=lambda: "c" + uuid.uuid4().hex[:10])
    nats: NatsServer | None = None
    nc: NatsClient | None = None
    js: JetStreamContext | None = None
    settings: Settings | None = None
    env: dict[str, str] = field(default_factory=dict)
    gws: list[Gateway] = field(default_factory=list)
    ingest: subprocess.Popen[bytes] | None = None
    proxy: RoundRobinProxy | None = None

    @property
    def names(self) -> Names:
        return Names(self.namespace)

    @property
    def ws_url(self) -> str:
        return self.proxy.ws_url if self.proxy is not None else self.gws[0].ws_url

    async def start(self) -> None:
        self.nats = NatsServer(store_dir=self.tmp / "nats", log_file=self.tmp / "nats.log")
        await asyncio.to_thread(self.nats.start)
        self.settings = Settings(
            nats_url=[self.nats.url],
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
            "TOCSIN_LOG_LEVEL": "WARNING",
        }
        self.nc = await nats.connect(
            self.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        self.js = self.nc.jetstream(timeout=3)
        await apply_topology(self.js, self.settings, self.names)
        self.gws = [
            Gateway(free_port(), self.tmp / f"gateway-{i}.log", self.env)
            for i in range(self.gateways)
        ]
        for gw in self.gws:
            gw.start()
        self.start_ingest()
        await asyncio.gather(*(gw.wait_up() for gw in self.gws))
        if self.use_proxy:
            self.proxy = await RoundRobinProxy([("127.0.0.1", g.port) for g in self.gws]).start()

    def start_ingest(self) -> None:
        self.ingest = spawn(["ingest"], self.env, self.tmp / "ingest.log")

    def kill_ingest(self) -> None:
        if self.ingest is not None:
            stop_process(self.ingest, 5, signal.SIGKILL)

    async def restart_nats(self) -> None:
        assert self.nats is not None
        await asyncio.to_thread(self.nats.stop)
        await asyncio.to_thread(self.nats.start)  # same port, same store

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
        while True:
            try:
                await self.scene.js.publish(
                    self.scene.names.ingest_subject, payload, headers=headers, timeout=2
                )
            except Exception:  # NATS restarting: the same alert_id again (deduped)
                if time.monotonic() > deadline:
                    raise AssertionError(f"alert {body['alert_id']} never PubAck'ed") from None
                self.retries += 1
                await asyncio.sleep(0.1)
                continue
            self.verifier.record_publish(body, time.monotonic())
            return

    async def run(self, mode: Mode) -> None:
        start = time.monotonic()
        end = start + mode.load_seconds
        for n in range(mode.max_alerts):
            now = time.monotonic()
            if now >= end:
                break
            await self.publish(make_alert(self.rng), now + 60)
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
) -> Outcome:
    seed = seed if seed is not None else int(os.environ.get("TOCSIN_CHAOS_SEED", time.time_ns()))
    seed %= 1_000_000
    rng = random.Random(seed)
    verifier = Verifier(f"{name}")
    scene = Scene(tmp, gateways=gateways, use_proxy=use_proxy)
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
            pauses=MODE.faults,
        )
        for s in specs
    ]
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
        await asyncio.gather(
            engine.run(MODE), *(inj(scene, verifier, rng, load_over) for inj in injectors)
        )
        load_over.set()
        for fault in verifier.faults:
            if fault.kind == "never_ack" and fault.end is None:
                verifier.fault_end(fault, time.monotonic())
        load_seconds = time.monotonic() - load_started
        deadline = time.monotonic() + MODE.drain_seconds
        laggards = [k for k, d in verifier.devices.items() if d.behaviour == "never_ack"]

        def drained() -> bool:  # and what never-ack devices hold unacked has come again
            resent = all(any(r.redelivered for r in verifier.receipts[k]) for k in laggards)
            return resent and verifier.all_received()

        while not drained() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)  # polling a condition with a deadline
        finish.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        report = verifier.report(await scene.stream_seqs())
        report.mode, report.seconds = MODE.name, load_seconds
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
            await gw.wait_up()
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
