"""What the scenarios share: nats-server, tokens, alerts, phases, tables and result files.

Everything runs on loopback: a nats-server of the pinned wheel with a temporary store, an
in-process gateway (:func:`tocsin.gateway.local.start_local_gateway`) where a scenario
needs one, tokens minted with a secret made for the run. Percentiles here are nearest-rank
(the scenarios' results have always been), unlike ``tocsin bench``'s table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import orjson
from pydantic import ValidationError

import tocsin
from tocsin.bench.procs import usage
from tocsin.bench.run import machine
from tocsin.core.auth import mint_token
from tocsin.core.embedded import NatsServer
from tocsin.core.settings import Settings, isolated_settings
from tocsin.gateway.local import LocalGateway
from tocsin.gateway.session import Mode
from tocsin.schemas import Alert
from tocsin.schemas.samples import alert_body

T = TypeVar("T")

#: Where results go unless ``--out`` says otherwise: relative to the current directory.
RESULTS = Path("benchmarks/results")
PHASE_LIMIT = 120.0  # seconds; a phase that takes longer is aborted and reported
BROADCAST_DEADLINE = 20.0  # seconds for all devices to get one broadcast
CONNECT_CONCURRENCY = 50
CLIENT_ID = "bench"


# ---------------------------------------------------------------- secrets, tokens, alerts


def new_secret() -> str:
    """A JWT secret for one run: nothing outside the run can mint its tokens."""
    return secrets.token_urlsafe(48)


def token(
    secret: str,
    sub: str,
    regions: tuple[str, ...] = ("KE",),
    roles: tuple[str, ...] = ("health_worker",),
    ttl: float = 24 * 3600,
) -> str:
    return mint_token(secret, sub, roles=roles, regions=regions, ttl_seconds=ttl)


def make_alert(region: str = "KE-30", **fields: Any) -> Alert:
    return Alert.model_validate(alert_body(region, **fields))


# ---------------------------------------------------------------- nats-server and gateway


class LocalNats:
    """One nats-server on loopback with a temporary store and log; killed on exit (the
    store is thrown away, and SIGTERM takes ~10 ms per consumer), its log's warnings kept
    in :attr:`log_warnings`."""

    def __init__(self, prefix: str = "tocsin-bench-") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.log = self.dir / "nats.log"
        self.server = NatsServer(store_dir=self.dir / "nats", log_file=self.log)
        self.log_warnings: dict[str, int] = {}

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int:
        assert self.server.process is not None, "not started"
        return self.server.process.pid

    def __enter__(self) -> LocalNats:
        try:
            self.server.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.server.kill()
        self.log_warnings = nats_log_summary(self.log)
        shutil.rmtree(self.dir, ignore_errors=True)


def gateway_settings(
    nats_url: str, namespace: str, secret: str, data_dir: Path, **values: Any
) -> Settings:
    """Settings of an in-process gateway: the defaults, whatever this process's environment
    holds, except what is given here."""
    base: dict[str, Any] = {
        "nats_url": [nats_url],
        "namespace": namespace,
        "jwt_secret": secret,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "data_dir": data_dir,
    }
    return isolated_settings(**(base | values))


# ---------------------------------------------------------------- numbers and tables


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))]


def fmt(value: Any, digits: int = 1, nan: str = "n/a") -> str:
    """A table cell: floats with ``digits`` and thousands separators, NaN as ``nan``."""
    if isinstance(value, float):
        return nan if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def write_results(out: Path, stem: str, text: str, data: dict[str, Any]) -> Path:
    """``out/stem.md`` (``text``) and ``out/stem.json`` (``data``); the Markdown's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    progress(f"written: {out / stem}.md and .json")
    return out / f"{stem}.md"


# ---------------------------------------------------------------- what was measured


def code_version() -> str:
    """The commit of the tocsin measured, and whether its sources had local changes."""
    root = Path(tocsin.__file__).resolve().parent

    def git(*args: str, cwd: Path = root) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
            )
            return out.stdout.strip() if out.returncode == 0 else ""
        return ""

    top = git("rev-parse", "--show-toplevel")
    if not top:
        return f"{root} (not a git checkout)"
    dirty = git("status", "--porcelain", "--", str(root), "schemas", cwd=Path(top))
    return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes" if dirty else "")


def server_version() -> str:
    return str(machine()["nats_server"])


def cpu_model() -> str:
    return str(machine()["cpu_model"])


def nats_log_summary(path: Path) -> dict[str, int]:
    """The 20 most frequent warnings, errors and fatal lines of a nats-server log."""
    counts: Counter[str] = Counter()
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            for level in ("[WRN]", "[ERR]", "[FTL]"):
                if level in line:
                    counts[f"{level} {line.split(level, 1)[1].strip()[:120]}"] += 1
    return dict(counts.most_common(20))


# ---------------------------------------------------------------- CPU, memory, GC, logs


@dataclass
class PhaseUsage:
    wall: float = 0.0
    cpu: float = 0.0
    nats_cpu: float = 0.0
    rss_mb: float = 0.0
    nats_rss_mb: float = 0.0
    status: str = "ok"


class Meter:
    """CPU seconds and RSS of this process and of nats-server, accumulated per phase."""

    def __init__(self, nats_pid: int) -> None:
        self.nats_pid = nats_pid
        self.phases: dict[str, PhaseUsage] = {}

    def snap(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), usage(self.nats_pid).cpu_seconds

    def add(self, phase: str, start: tuple[float, float, float]) -> None:
        end = self.snap()
        u = self.phases.setdefault(phase, PhaseUsage())
        u.wall += end[0] - start[0]
        u.cpu += end[1] - start[1]
        u.nats_cpu += end[2] - start[2]
        u.rss_mb = usage(os.getpid()).rss_bytes / 2**20
        u.nats_rss_mb = usage(self.nats_pid).rss_bytes / 2**20


class GcPauses:
    """Pauses of Python's cyclic garbage collector in this process, per generation."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._start = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._start))

    def summary(self) -> dict[str, Any]:
        return {
            f"gen{g}": {"count": len(ms), "total_ms": sum(ms), "max_ms": max(ms, default=0.0)}
            for g in (0, 1, 2)
            for ms in [[p * 1000 for gen, p in self.pauses if gen == g]]
        }


class LogCollector(logging.Handler):
    """Counts every warning or error anything in this process logs (the gateway included)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().splitlines()[0][:160] if record.getMessage() else ""
        self.counts[f"{record.levelname} {record.name}: {text}"] += 1


# ---------------------------------------------------------------- broadcasts and devices


@dataclass
class Broadcast:
    expected: int
    t0: float = 0.0
    times: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Recorder:
    """Receipt times per alert_id; a broadcast is done when every device has it."""

    def __init__(self) -> None:
        self.open: dict[int | str, Broadcast] = {}
        self.stray = 0  # receipts of an alert no longer (or never) waited for
        self.extra = 0  # receipts beyond one per device
        self.frames: Counter[str] = Counter()  # non-alert frames by type

    def hit(self, alert_id: int | str, t: float) -> None:
        b = self.open.get(alert_id)
        if b is None:
            self.stray += 1
            return
        b.times.append(t)
        if len(b.times) == b.expected:
            b.done.set()
        elif len(b.times) > b.expected:
            self.extra += 1


def ws_params(tok: str, ack_mode: str, client_id: str = CLIENT_ID) -> dict[str, str]:
    return {"auth_token": tok, "client_id": client_id, "ack_mode": ack_mode}


async def read_socket(
    ws: aiohttp.ClientWebSocketResponse, rec: Recorder, established: asyncio.Event
) -> None:
    """The one reader task of a socket: timestamp, parse, record; answer pings."""
    async for msg in ws:
        if msg.type is not aiohttp.WSMsgType.TEXT:
            continue
        t = time.perf_counter()
        frame = orjson.loads(msg.data)
        kind = frame["type"]
        if kind == "alert":
            rec.hit(frame["alert"]["alert_id"], t)
        elif kind == "ping":
            await ws.send_str(orjson.dumps({"type": "pong", "ts": frame["ts"]}).decode())
        elif kind == "connection_established":
            established.set()
        else:
            rec.frames[kind] += 1


@dataclass
class WsDevice:
    ws: aiohttp.ClientWebSocketResponse
    reader: asyncio.Task[None]


async def wait_for(check: Callable[[], bool], limit: float) -> bool:
    """Poll ``check`` every 20 ms for at most ``limit`` seconds; whether it came true."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def close_devices(devices: list[WsDevice]) -> None:
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(d: WsDevice) -> None:
        async with gate:
            await d.ws.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(d.reader, 10)

    await asyncio.gather(*(one(d) for d in devices))


# ---------------------------------------------------------------- an in-process run


class InProcessBench:
    """One run with its own nats-server and an in-process gateway (``measure``, in the
    subclass), in bounded phases whose CPU, wall time and RSS are charged by name."""

    def __init__(self, quick: bool, gateway: dict[str, Any] | None = None) -> None:
        self.quick = quick
        self.gateway_values = dict(gateway or {})  # settings of the gateway (``--set``)
        self.secret = new_secret()
        self.results: dict[str, Any] = {"aborted": [], "anomalies": []}
        self.log = LogCollector()
        self.failed: str | None = None

    def token(self, sub: str, regions: tuple[str, ...] = ("KE",)) -> str:
        return token(self.secret, sub, regions)

    def settings(self, nats: LocalNats, namespace: str) -> Settings:
        values = {"shutdown_grace_seconds": 5} | self.gateway_values
        return gateway_settings(nats.url, namespace, self.secret, nats.dir / "data", **values)

    async def bounded(self, name: str, work: Awaitable[T], limit: float = PHASE_LIMIT) -> T | None:
        """Await ``work`` for at most ``limit`` seconds; on abort or failure say so, go on
        (``self.failed`` then holds the reason)."""
        progress(f"phase: {name}")
        self.failed = None
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(limit) as cm:
                result = await work
        except TimeoutError:
            why = f"aborted after {limit:.0f} s" if cm.expired() else "a timeout inside"
        except Exception as exc:
            why = f"failed: {type(exc).__name__}: {exc}"
        else:
            progress(f"  done in {time.perf_counter() - t0:.1f} s")
            return result
        self.failed = why
        self.results["aborted"].append(f"{name}: {why}")
        progress(f"!! PHASE {name!r} {why}")
        return None

    async def phase(self, meter: Meter, name: str, work: Awaitable[T]) -> T | None:
        """A bounded phase whose CPU, wall time and RSS are charged to ``name``."""
        start = meter.snap()
        result = await self.bounded(name, work)
        meter.add(name, start)
        if self.failed:
            meter.phases[name].status = f"ABORTED: {self.failed}"
        return result

    async def run(self) -> dict[str, Any]:
        root = logging.getLogger()
        level = root.level
        root.addHandler(self.log)
        root.setLevel(logging.WARNING)
        try:
            with LocalNats() as nats:
                pauses = GcPauses()
                try:
                    with pauses:
                        await self.measure(nats)
                finally:
                    self.results["gc_pauses"] = pauses.summary()
            self.results["nats_log"] = nats.log_warnings
        finally:
            root.removeHandler(self.log)
            root.setLevel(level)
        self.results["gateway_log"] = dict(self.log.counts.most_common(20))
        self.results["gateway_log_total"] = sum(self.log.counts.values())
        return self.results

    async def measure(self, nats: LocalNats) -> None:
        raise NotImplementedError


def live_sessions(gw: LocalGateway) -> int:
    return sum(1 for s in gw.gw.sessions if s.mode is Mode.LIVE)


# ---------------------------------------------------------------- the command line


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``; SIGTERM cancels it, so its ``finally`` blocks stop
    nats-server (it runs in a session of its own and would outlive this process)."""

    async def guarded() -> T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await main
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(guarded())


def run_and_write(
    run: Coroutine[Any, Any, dict[str, Any]],
    report: Callable[[dict[str, Any], dt.datetime], str],
    out: Path,
    stem: Callable[[dt.datetime], str],
) -> int:
    """A scenario's command after its options: run it (:func:`run_async`), print its
    report and write it with its JSON twin as ``out/stem(when)``; the exit code (143 on
    SIGTERM, once everything it started is stopped)."""
    when = dt.datetime.now()
    try:
        results = run_async(run)
    except asyncio.CancelledError:  # SIGTERM: everything it started is stopped
        return 143
    text = report(results, when)
    print(text)
    write_results(out, stem(when), text, results)
    return 0


#: Settings an in-process run decides itself (``--set`` refuses them).
RUN_OWNS = frozenset({"nats_url", "namespace", "jwt_secret", "http_host", "http_port", "data_dir"})


def set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TOCSIN_NAME=VALUE",
        help="a setting of the in-process gateway, e.g. TOCSIN_CHECKPOINT_SECONDS=1 "
        "(repeatable; the environment's TOCSIN_* variables are not read)",
    )


def parse_sets(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, Any]:
    """``--set`` values as Settings fields (``TOCSIN_CHECKPOINT_SECONDS=1`` ->
    ``checkpoint_seconds``), checked by Settings itself; ``parser.error`` on a bad one."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name = key.removeprefix("TOCSIN_").lower()
        if not sep or not key.startswith("TOCSIN_") or name not in Settings.model_fields:
            parser.error(f"--set: expected TOCSIN_NAME=value with a known setting, got {item!r}")
        if name in RUN_OWNS:
            parser.error(f"--set: {key} is the run's own (its nats-server, namespace, secret)")
        values[name] = value
    try:
        isolated_settings(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = f"TOCSIN_{str(first['loc'][0]).upper()}: " if first["loc"] else ""
        parser.error(f"--set: {where}{first['msg']}")
    return values


def out_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="where the .md and .json go (default: %(default)s, under the current directory)",
    )
