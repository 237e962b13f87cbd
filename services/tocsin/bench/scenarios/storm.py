"""Reconnect storm: a gateway restart with every device reconnecting at once.

One nats-server and one ``tocsin gateway`` process (measured from outside through
``/proc``), clients of the load generator (:mod:`tocsin.bench.loadgen`) with client acks.
N devices (``--devices``) connect and go live. Then, once per signal (``SIGTERM``, then
``SIGKILL``, on the same nats-server and the same devices):

1. the gateway is stopped by the signal (SIGTERM: it saves every position and lets every
   device go; SIGKILL: nothing of it says goodbye);
2. while it is down, K alerts (``--alerts``) are appended that every device must receive:
   its backlog;
3. a new gateway starts on the same port; once it is ready (``/readyz``), every device
   reconnects at a random moment within ``--window`` seconds (full jitter) and, when its
   handshake fails, tries again after a random pause of up to 0.5, 1, 2 … 8 s (full-jitter
   exponential backoff);
4. the round ends when every device has received its K alerts (or at ``--deadline``).

Reported per round: the time from the new gateway's readiness until every device was live
and had its backlog (p50/p99/max per device, and to ``connection_established``),
handshake failures by kind (HTTP status, close code before ``connection_established``,
refused TCP, timeout), connection attempts, closes after ``connection_established``, CPU
of nats-server and the gateway during the storm, and what JetStream saw per reconnect, by
kind.

JetStream traffic is counted by a NATS connection of its own in the same account,
subscribed to ``$JS.API.>`` (every API request: a copy reaches any subscriber of its
subject), the ``DEVICES`` record subjects (record writes are plain JetStream publishes,
not API calls) and ``$JS.ACK.>`` (acks), classified as :mod:`.ownership` does. Not
``tocsin.gateway.>``: a subscriber there would turn the "no responders" a killed gateway's
takeover subject answers into a wait of ``ASK_SECONDS`` per claim (every claim after a
SIGKILL failed with 4503 that way in the first try of this scenario); takeover requests
are core NATS and are not counted. Why a subscriber and not nats-server's ``/jsz``: its
``api.total`` counts only some kinds (measured on 2.15.1: ``CONSUMER.INFO`` and creates,
not ``CONSUMER.RESET``, ``STREAM.MSG.GET`` or ``DIRECT.GET``; ``CONSUMER.MSG.NEXT`` goes
to the consumer itself), and no kinds at all. It is read beside, per phase (``jsz_api``).
Counts are split into the shutdown (signal until the old gateway exited), the storm
(readiness until all have their backlog) and the settle period after it (``SETTLE`` s:
the checkpoints of the acks the storm brought).

Results: stdout and ``benchmarks/results/storm-<date>-<time>-d<devices>.md`` (under the current
directory, or ``--out``) with a JSON twin. ``--gateway-code DIR`` runs the gateway
processes from another source tree (its ``services`` directory on ``PYTHONPATH``): the
way to measure a base commit from a worktree in the same session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.aio.client

from tocsin.core.embedded import NatsServer
from tocsin.core.naming import Names
from tocsin.core.settings import isolated_settings
from tocsin.core.supervisor import Child, free_port, http_status, settings_env, tocsin_argv
from tocsin.gateway.handler import WS_PATH
from tocsin.ingest.pipeline import append_alert

from ..loadgen import ClientSpec, LoadGen, alert_key
from ..procs import usage
from .common import (
    code_version,
    fmt,
    make_alert,
    new_secret,
    out_option,
    percentile,
    progress,
    run_and_write,
    server_version,
    token,
)
from .ownership import Classifier

NAMESPACE = "storm"
#: Full-jitter exponential backoff after a failed handshake: up to BASE·2^k, at most CAP.
BACKOFF_BASE, BACKOFF_CAP = 0.5, 8.0
#: Reconnects start in slices of this many seconds (one load generator call each).
SLICE = 0.01
#: One handshake may take this long before it counts as a failure (and is retried).
CONNECT_TIMEOUT = 60.0
#: After the storm, its trailing work (checkpoints of the acks it brought) is counted for
#: this long: longer than the gateway's TOCSIN_CHECKPOINT_SECONDS (set to CHECKPOINT).
CHECKPOINT = 2.0
SETTLE = CHECKPOINT + 2.0
SIGNALS = {"term": signal.SIGTERM, "kill": signal.SIGKILL}
#: The first connect of every device (new devices: each creates its queue) is tried this
#: often for whoever failed.
SETUP_TRIES = 3


@dataclass(frozen=True)
class Options:
    devices: int = 10_000
    alerts: int = 3
    window: float = 2.0
    signals: tuple[str, ...] = ("term", "kill")
    deadline: float = 300.0
    processes: int = 2
    gateway_code: Path | None = None  # a source tree's services directory; None: this one
    quick: bool = False


@dataclass
class Storm:
    """One round's reconnects: which client index is which device, and every attempt."""

    devices: int
    t0: float  # monotonic seconds: the new gateway was ready
    owner: dict[int, int] = field(default_factory=dict)  # client index -> device
    attempts: list[int] = field(default_factory=list)
    established_at: list[float] = field(default_factory=list)  # s after t0 (last attempt)
    failures: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.attempts = [0] * self.devices
        self.established_at = [math.nan] * self.devices


def failure_kind(reason: str) -> str:
    """A load generator failure reason as a kind: ``HTTP 503``, ``close 4503``, ..."""
    if reason.startswith("HTTP "):
        return reason.split(":", 1)[0]
    if reason.startswith("closed with "):
        return "close " + reason.split()[2]
    if reason.startswith("connect: "):
        return reason.split(":", 2)[1].strip()
    if reason.startswith("no connection_established within"):
        return "timeout"
    return reason[:60]


class Counting:
    """A NATS connection of its own counting JetStream traffic by kind (module docstring)."""

    def __init__(self, url: str, names: Names, monitor: str) -> None:
        self.url = url
        self.classify = Classifier(names)
        self.monitor = monitor  # nats-server's monitoring base URL, for /jsz
        self.counts: Counter[str] = Counter()
        self.nc: nats.aio.client.Client | None = None

    async def start(self) -> None:
        self.nc = await nats.connect(self.url, name="storm-monitor")
        c = self.classify

        async def seen(msg: Any) -> None:
            self.counts[c.kind(msg.subject)] += 1

        # Not tocsin.gateway.>: a subscriber there answers nothing but turns the "no
        # responders" of a killed gateway's takeover subject into a wait (ownership.py).
        for subject in ("$JS.API.>", c.records + ">", "$JS.ACK.>"):
            await self.nc.subscribe(subject, cb=seen, pending_msgs_limit=10_000_000)
        await self.nc.flush()

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    def jsz_api(self) -> int:
        with urllib.request.urlopen(f"{self.monitor}/jsz", timeout=10) as reply:
            return int(json.loads(reply.read())["api"]["total"])

    async def snapshot(self) -> tuple[Counter[str], int]:
        """Counts so far, once the subscriber has caught up with the server."""
        assert self.nc is not None
        await self.nc.flush(timeout=30)
        await asyncio.sleep(0.1)  # the callbacks of what the flush let through
        return Counter(self.counts), await asyncio.to_thread(self.jsz_api)


def window_counts(
    a: tuple[Counter[str], int], b: tuple[Counter[str], int], per: int
) -> dict[str, Any]:
    counts = b[0] - a[0]
    api_seen = sum(v for k, v in counts.items() if k.startswith("JS ") and k != "JS ack")
    return {
        "counts": dict(sorted(counts.items())),
        "per_reconnect": {k: v / max(1, per) for k, v in sorted(counts.items())},
        "api_seen": api_seen,
        "jsz_api": b[1] - a[1],
    }


class Bench:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.dir = Path(tempfile.mkdtemp(prefix="tocsin-storm-"))
        self.secret = new_secret()
        self.names = Names(NAMESPACE)
        self.port = free_port()
        self.nats = NatsServer(
            store_dir=self.dir / "nats", log_file=self.dir / "nats.log", monitor_port=free_port()
        )
        self.gateway: Child | None = None
        self.generation = 0
        self.region = "KE"

    # ---------------------------------------------------------------- processes
    def _env(self) -> dict[str, str]:
        settings = isolated_settings(
            nats_url=[self.nats.url],
            namespace=NAMESPACE,
            jwt_secret=self.secret,
            http_host="127.0.0.1",
            http_port=self.port,
            max_devices=self.o.devices + 100,
            checkpoint_seconds=CHECKPOINT,
            data_dir=self.dir / "data",
            log_level="WARNING",
            shutdown_grace_seconds=120,
        )
        env = settings_env(settings)
        if self.o.gateway_code is not None:
            env["PYTHONPATH"] = str(self.o.gateway_code)
        return env

    def start_gateway(self) -> float:
        """Start a gateway on the port; the monotonic time at which it was ready."""
        self.generation += 1
        log = self.dir / f"gateway-{self.generation}.log"
        self.gateway = Child("gateway", tocsin_argv("gateway"), self._env(), log).start()
        http = f"http://127.0.0.1:{self.port}/readyz"
        self.gateway.wait_ready(lambda: http_status(http)[0] == 200, 120, "ready (/readyz)")
        return time.monotonic()

    def gateway_code(self) -> str:
        if self.o.gateway_code is None:
            return code_version()
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=self.o.gateway_code,
            capture_output=True,
            text=True,
            check=False,
        )
        return f"{out.stdout.strip() or '?'} ({self.o.gateway_code})"

    # ---------------------------------------------------------------- the run
    async def run(self) -> dict[str, Any]:
        o = self.o
        results: dict[str, Any] = {
            "code": code_version(),
            "gateway_code": self.gateway_code(),
            "nats_server": server_version(),
            "devices": o.devices,
            "alerts": o.alerts,
            "window_seconds": o.window,
            "backoff": f"full jitter, {BACKOFF_BASE:g}·2^k s, at most {BACKOFF_CAP:g} s",
            "checkpoint_seconds": CHECKPOINT,
            "rounds": [],
        }
        self.nats.start()
        counting = Counting(self.nats.url, self.names, f"http://127.0.0.1:{self.nats.monitor_port}")
        lg = LoadGen("127.0.0.1", self.port, processes=o.processes)
        nc = None
        try:
            await asyncio.to_thread(self.start_gateway)
            await lg.start()
            await counting.start()
            nc = await nats.connect(self.nats.url, name="storm-publisher")
            js = nc.jetstream()
            progress(f"storm: connecting {o.devices} devices")
            t = time.monotonic()
            left = list(range(o.devices))
            for _ in range(SETUP_TRIES):  # setup, not measured: whoever failed tries again
                first = lg._next_client  # connect() numbers its specs from here
                done = await lg.connect(self.specs(left), concurrency=100, timeout=120)
                ok = {left[c - first] for c in done.clients}
                left = [d for d in left if d not in ok]
                if not left:
                    break
                progress(f"storm: {len(left)} not connected ({done.failures}); again")
            if left:
                raise RuntimeError(f"first connect: {len(left)} devices could not connect")
            results["first_connect_seconds"] = time.monotonic() - t
            for name in o.signals:
                progress(f"storm: {name}, {o.devices} devices")
                results["rounds"].append(await self.round(name, lg, js, counting))
        finally:
            await counting.stop()
            if nc is not None:
                with contextlib.suppress(Exception):
                    await nc.close()
            with contextlib.suppress(Exception):
                await lg.stop(timeout=10)
            if self.gateway is not None:
                await asyncio.to_thread(self.gateway.kill)
            self.nats.kill()
            shutil.rmtree(self.dir, ignore_errors=True)
        return results

    def specs(self, devices: list[int] | None = None) -> list[ClientSpec]:
        out = []
        for i in range(self.o.devices) if devices is None else devices:
            tok = token(self.secret, f"d{i}", regions=(self.region,))
            query = f"auth_token={tok}&client_id=storm&ack_mode=client"
            out.append(ClientSpec(f"{WS_PATH}?{query}", ack=True))
        return out

    async def round(self, name: str, lg: LoadGen, js: Any, counting: Counting) -> dict[str, Any]:
        o = self.o
        assert self.gateway is not None and self.gateway.proc is not None
        pid = self.gateway.pid
        assert pid is not None
        await lg.collect()  # drop the receipts so far
        before_status = await lg.status()
        c0 = await counting.snapshot()
        t_signal = time.monotonic()
        self.gateway.proc.send_signal(SIGNALS[name])
        await asyncio.to_thread(self.gateway.proc.wait, 180)
        shutdown_s = time.monotonic() - t_signal
        c1 = await counting.snapshot()
        # The old connections are gone once the gateway is: wait until the clients saw it.
        deadline = time.monotonic() + 30
        while (await lg.status()).open and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        closed = Counter((await lg.status()).closed) - Counter(before_status.closed)
        backlog = [make_alert(f"{self.region}-30") for _ in range(o.alerts)]
        for alert in backlog:
            await append_alert(js, self.names, alert)
        wanted = {alert_key(a.alert_id) for a in backlog}
        c2 = await counting.snapshot()
        t_spawn = time.monotonic()
        t0 = await asyncio.to_thread(self.start_gateway)
        pid = self.gateway.pid
        assert pid is not None
        nats_pid = self.nats.process.pid if self.nats.process is not None else 0
        u_gw, u_nats = usage(pid), usage(nats_pid)
        c3 = await counting.snapshot()
        status_before = await lg.status()
        storm = Storm(o.devices, t0)
        rng = random.Random(o.devices)
        slices: dict[int, list[int]] = {}
        for d in range(o.devices):
            slices.setdefault(int(rng.uniform(0, o.window) / SLICE), []).append(d)
        for k, devices in sorted(slices.items()):
            self.spawn(storm, self.attempt(storm, lg, devices, t0 + k * SLICE, rng))
        got: list[dict[int, int]] = [{} for _ in range(o.devices)]  # alert -> first recv ns
        done_at = [math.nan] * o.devices
        remaining = o.devices
        end = t0 + o.deadline
        while remaining and time.monotonic() < end:
            await asyncio.sleep(0.1)
            receipts = await lg.collect()
            for aid, ns, client in zip(
                receipts.alert_ids, receipts.recv_ns, receipts.clients, strict=True
            ):
                device = storm.owner.get(client)
                if device is None or aid not in wanted or aid in got[device]:
                    continue
                got[device][aid] = ns
                if len(got[device]) == len(wanted):
                    done_at[device] = ns / 1e9 - t0
                    remaining -= 1
        t_all = time.monotonic()
        u_gw2, u_nats2 = usage(pid), usage(nats_pid)
        c4 = await counting.snapshot()
        for task in list(storm.tasks):
            task.cancel()
        await asyncio.sleep(SETTLE)  # the checkpoints of the storm's acks
        c5 = await counting.snapshot()
        status = await lg.status()
        live = [d for d in done_at if not math.isnan(d)]
        est = [e for e in storm.established_at if not math.isnan(e)]
        storm_s = t_all - t0
        return {
            "signal": name,
            "shutdown_seconds": shutdown_s,
            "old_connections_closed": {str(k): v for k, v in sorted(closed.items())},
            "gateway_start_seconds": t0 - t_spawn,
            "all_live_seconds": max(live) if remaining == 0 else math.nan,
            "complete": o.devices - remaining,
            "incomplete": remaining,
            "backlog_ms": summary([1000 * d for d in live]),
            "established_ms": summary([1000 * e for e in est]),
            "attempts": sum(storm.attempts),
            "attempts_max": max(storm.attempts, default=0),
            "handshake_failures": dict(storm.failures.most_common()),
            "closed_after_established": {
                str(k): v
                for k, v in sorted((Counter(status.closed) - Counter(status_before.closed)).items())
            },
            "cpu": {
                "gateway_seconds": u_gw2.cpu_seconds - u_gw.cpu_seconds,
                "nats_seconds": u_nats2.cpu_seconds - u_nats.cpu_seconds,
                "storm_seconds": storm_s,
                "gateway_cores": (u_gw2.cpu_seconds - u_gw.cpu_seconds) / storm_s,
                "nats_cores": (u_nats2.cpu_seconds - u_nats.cpu_seconds) / storm_s,
            },
            "js_shutdown": window_counts(c0, c1, o.devices),
            "js_while_down": window_counts(c1, c2, o.devices),
            "js_start": window_counts(c2, c3, o.devices),
            "js_storm": window_counts(c3, c4, o.devices),
            "js_settle": window_counts(c4, c5, o.devices),
        }

    @staticmethod
    def spawn(storm: Storm, coro: Any) -> None:
        task = asyncio.create_task(coro)
        storm.tasks.add(task)
        task.add_done_callback(storm.tasks.discard)

    async def attempt(
        self, storm: Storm, lg: LoadGen, devices: list[int], at: float, rng: random.Random
    ) -> None:
        """Connect ``devices`` at monotonic time ``at``; each that fails tries again alone
        after its backoff."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        for d in devices:
            storm.attempts[d] += 1
        first = lg._next_client  # connect() numbers its specs from here, before it awaits
        for i, d in enumerate(devices):
            storm.owner[first + i] = d  # before any alert of it can be collected
        result = await lg.connect(
            self.specs(devices), concurrency=len(devices), timeout=CONNECT_TIMEOUT
        )
        ok = set()
        for client, ms, started in zip(
            result.clients, result.established_ms, result.started_ns, strict=True
        ):
            d = storm.owner[client]
            ok.add(d)
            storm.established_at[d] = started / 1e9 + ms / 1000 - storm.t0
        for reason, count in result.failures.items():
            storm.failures[failure_kind(reason)] += count
        for d in devices:
            if d not in ok:
                k = storm.attempts[d]
                pause = rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (k - 1)))
                self.spawn(storm, self.attempt(storm, lg, [d], time.monotonic() + pause, rng))


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else math.nan,
    }


async def run(opts: Options) -> dict[str, Any]:
    return await Bench(opts).run()


def _kinds(rounds: list[dict[str, Any]], window: str) -> list[str]:
    kinds = {k for r in rounds for k in r[window]["counts"]}
    return sorted(kinds, key=lambda k: (not k.startswith("JS "), k))


def report(results: dict[str, Any], when: dt.datetime) -> str:
    rounds = results["rounds"]
    n = results["devices"]
    lines = [
        f"# tocsin bench storm, {when:%Y-%m-%d %H:%M}",
        "",
        f"{n:,} devices (client acks), each with a backlog of {results['alerts']} alerts "
        f"appended while the gateway was down; reconnects with full jitter over "
        f"{results['window_seconds']:g} s, retries {results['backoff']}. Gateway code "
        f"{results['gateway_code']}; bench code {results['code']}; nats-server "
        f"{results['nats_server']}.",
        "",
        "| signal | shutdown s | gateway start s | all live + backlog s "
        "| backlog p50 / p99 / max ms | established p50 / p99 ms | complete "
        "| attempts (max per device) | handshake failures "
        "| closed after established | gateway CPU s (cores) | nats-server CPU s (cores) |",
        "|---|---:|---:|---:|---|---|---:|---:|---|---|---|---|",
    ]
    for r in rounds:
        b, e, cpu = r["backlog_ms"], r["established_ms"], r["cpu"]
        failures = ", ".join(f"{k}: {v}" for k, v in r["handshake_failures"].items()) or "none"
        closed = ", ".join(f"{k}: {v}" for k, v in r["closed_after_established"].items())
        lines.append(
            f"| {r['signal']} | {fmt(r['shutdown_seconds'], 2)} | "
            f"{fmt(r['gateway_start_seconds'], 2)} | {fmt(r['all_live_seconds'], 2)} | "
            f"{fmt(b['p50'], 0)} / {fmt(b['p99'], 0)} / {fmt(b['max'], 0)} | "
            f"{fmt(e['p50'], 0)} / {fmt(e['p99'], 0)} | {r['complete']:,}/{n:,} | "
            f"{r['attempts']:,} ({r['attempts_max']}) | {failures} | {closed or 'none'} | "
            f"{fmt(cpu['gateway_seconds'], 1)} ({fmt(cpu['gateway_cores'], 2)}) | "
            f"{fmt(cpu['nats_seconds'], 1)} ({fmt(cpu['nats_cores'], 2)}) |"
        )
    for window, title in (
        ("js_storm", "storm (ready → all live with backlog)"),
        ("js_settle", f"settle ({SETTLE:g} s after)"),
        ("js_shutdown", "shutdown (signal → old gateway exited)"),
    ):
        kinds = _kinds(rounds, window)
        lines += [
            "",
            f"## JetStream per reconnect, {title}",
            "",
            "| kind | " + " | ".join(r["signal"] for r in rounds) + " |",
            "|---|" + "---:|" * len(rounds),
        ]
        for kind in kinds:
            cells = [fmt(r[window]["per_reconnect"].get(kind, 0.0), 2) for r in rounds]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        api = [fmt(r[window]["api_seen"] / n, 2) for r in rounds]
        jsz = [fmt(r[window]["jsz_api"] / n, 2) for r in rounds]
        lines.append("| **JS API calls (subscriber)** | " + " | ".join(api) + " |")
        lines.append("| /jsz api.total (some kinds only) | " + " | ".join(jsz) + " |")
    lines += [
        "",
        "Per reconnect = count / devices. Kinds: `JS <API>` are `$JS.API` requests seen by a "
        "subscriber in the same account; record writes are `DEVICES` publishes; `JS ack` are "
        "`$JS.ACK` acks (takeover requests, core NATS, are not counted). nats-server's "
        "`/jsz` `api.total` for the same window is shown for comparison: it counts "
        "`CONSUMER.INFO` and creates, not `CONSUMER.RESET`, `STREAM.MSG.GET` or "
        "`CONSUMER.MSG.NEXT` (nats-server 2.15.1).",
    ]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Reconnect storm: a gateway restart (SIGTERM, then SIGKILL) with every "
        "device reconnecting at once with jitter (docs/benchmarks.md).",
    )
    parser.add_argument(
        "--devices",
        "--connections",
        type=int,
        default=0,
        help="devices (default 10,000; quick 500)",
    )
    parser.add_argument("--alerts", type=int, default=3, help="backlog per device (default 3)")
    parser.add_argument(
        "--window", type=float, default=2.0, help="reconnect jitter window, s (default 2)"
    )
    parser.add_argument(
        "--signals",
        default="term,kill",
        help="how the gateway is stopped, in order: term, kill (default term,kill)",
    )
    parser.add_argument(
        "--deadline", type=float, default=300.0, help="a round ends after this many s (300)"
    )
    parser.add_argument(
        "--gateway-code",
        type=Path,
        default=None,
        help="run the gateway processes from this source tree's services directory",
    )
    parser.add_argument("--quick", action="store_true", help="500 devices")
    out_option(parser)
    return parser


def options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Options:
    if not 0 <= args.devices <= 20_000:
        parser.error("--devices: must be between 1 and 20,000")
    if not 1 <= args.alerts <= 100:
        parser.error("--alerts: must be between 1 and 100")
    if not 0 <= args.window <= 60:
        parser.error("--window: must be between 0 and 60 seconds")
    if not 1 <= args.deadline <= 1800:
        parser.error("--deadline: must be between 1 and 1,800 seconds")
    signals = tuple(s.strip() for s in args.signals.split(",") if s.strip())
    bad = [s for s in signals if s not in SIGNALS]
    if not signals or bad:
        parser.error(f"--signals: expected term and/or kill, got {args.signals!r}")
    code = args.gateway_code
    if code is not None and not (code / "tocsin" / "__init__.py").is_file():
        parser.error(f"--gateway-code: {code} has no tocsin package")
    return Options(
        devices=args.devices or (500 if args.quick else 10_000),
        alerts=args.alerts,
        window=args.window,
        signals=signals,
        deadline=args.deadline,
        gateway_code=code.resolve() if code is not None else None,
        quick=args.quick,
    )


def stem(when: dt.datetime, opts: Options) -> str:
    return f"storm-{when:%Y-%m-%d-%H%M}-d{opts.devices}"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    opts = options(parser, args)
    return run_and_write(run(opts), report, args.out, lambda when: stem(when, opts))


if __name__ == "__main__":
    sys.exit(main())
