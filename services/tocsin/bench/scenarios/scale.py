"""How tocsin's cost grows with the connections it holds, up to 25,000 on one machine.

nats-server and G ``tocsin gateway`` processes sharing one port with SO_REUSEPORT, as
``TOCSIN_GATEWAYS=G tocsin run`` starts them (default G: one per core), each device with
its own durable queue as always; the load generator (:mod:`tocsin.bench.loadgen`, a few
worker processes) connects fresh devices in steps (``--step``, up to ``--devices``). At
every step, from ``/proc`` for every process (each gateway, nats-server, each load
generator worker): the time to connect that step (connects/s, handshake percentiles), RSS,
and the CPU the step cost; each gateway's own ``/metrics`` (its own port) says how many
connections it holds, so the kernel's spreading is seen too. With all held: every
process's CPU over ``--idle`` seconds of nothing, then ``--broadcasts`` alerts one at a
time to every device (publish -> receipt latency; CPU per broadcast per process).

What grows with what is fitted per process (least squares over the steps: KiB of RSS per
connection) and drawn: memory per process and each step's connect time against the
connections held (a PNG beside the table).

The limits met on the way, checked before the run: open files (the soft limit is raised
to the hard one here, in the workers and in the gateways; a worker holds
devices / workers sockets), loopback's ephemeral ports (every client socket to the one
port takes one: ``net.ipv4.ip_local_port_range``, 28,232 by default), nats-server memory
(about 57 KiB per durable). Every phase is bounded in time (``--limit`` for all the steps).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats

from tocsin.core.auth import mint_token
from tocsin.core.naming import Names
from tocsin.core.supervisor import raise_fd_limit
from tocsin.ingest.pipeline import append_alert

from ..loadgen import ClientSpec, LoadGen
from ..procs import Stack, Usage, usage
from ..run import machine, make_alert, settle, summary
from .common import code_version, fmt, out_option, parse_sets, progress, run_and_write, set_option

WS_PATH = "/api/v1/alerts/ws"
REGION = "UG"
HEARTBEAT = 30.0  # the default TOCSIN_HEARTBEAT_SECONDS: idle CPU includes its pings
BROADCAST_LIMIT = 120.0  # seconds for every device to get one broadcast
COUNT_LIMIT = 30.0  # seconds for the gateways' /metrics to count what the clients hold
PORT_MARGIN = 500  # ephemeral ports left for everything else on loopback


@dataclass
class Options:
    devices: int = 25_000
    step: int = 2_500
    gateways: int = field(default_factory=lambda: os.cpu_count() or 1)
    workers: int = 2  # load generator processes
    idle: float = 10.0
    broadcasts: int = 2
    concurrency: int = 256
    limit: float = 480.0  # seconds for all the connect steps
    gateway_env: dict[str, str] = field(default_factory=dict)


def ephemeral_ports() -> int:
    """How many local ports connect() may pick on this machine (each client socket to one
    server port needs one)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(high) - int(low) + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


def slope(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs`` (NaN for fewer than two points)."""
    if len(xs) < 2:
        return math.nan
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return math.nan if not var else cov / var


def limits_problem(o: Options) -> str | None:
    """What this machine's limits would not let the run do (None: nothing), before
    anything starts: open files (the soft limit raised to the hard one, as the workers and
    the gateways do) and loopback's ephemeral ports."""
    files = raise_fd_limit()
    per_worker = math.ceil(o.devices / o.workers)
    if per_worker + 200 > files:
        return (
            f"--workers {o.workers}: {per_worker:,} sockets per load generator process, over "
            f"the open-files limit {files:,} (ulimit -Hn); use more workers"
        )
    per_gateway = math.ceil(o.devices / o.gateways * 1.05)  # the kernel's spread is uneven
    if per_gateway + 500 > files:
        return (
            f"--gateways {o.gateways}: about {per_gateway:,} sockets per gateway process, over "
            f"the open-files limit {files:,} (ulimit -Hn); use more gateways"
        )
    ports = ephemeral_ports()
    if o.devices > ports - PORT_MARGIN:
        return (
            f"--devices {o.devices:,}: loopback has {ports:,} ephemeral ports "
            "(net.ipv4.ip_local_port_range), one per client socket to the one port"
        )
    return None


class Scale:
    def __init__(self, o: Options) -> None:
        self.o = o
        self.results: dict[str, Any] = {
            "code": code_version(),
            "machine": machine(),
            "devices": o.devices,
            "step": o.step,
            "gateways": o.gateways,
            "loadgen_workers": o.workers,
            "heartbeat_seconds": HEARTBEAT,
            "gateway_settings": o.gateway_env,
            "load_before": os.getloadavg(),
            "limits": {},
            "steps": [],
            "aborted": [],
        }
        self.secret = ""
        self.pids: dict[str, int] = {}

    # ------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        o = self.o
        self.results["limits"] = {
            "open_files_soft": raise_fd_limit(),
            "ephemeral_ports": ephemeral_ports(),
        }
        stack = Stack(
            heartbeat=HEARTBEAT,
            max_devices=o.devices + 1000,
            max_inflight=64,
            extra_env=o.gateway_env,
            gateways=o.gateways,
            ceiling=False,
        )
        self.secret = stack.secret
        gen: LoadGen | None = None
        try:
            progress(f"scale: nats-server and {o.gateways} gateway(s) on port {stack.gateway_port}")
            stack.start()
            gen = LoadGen("127.0.0.1", stack.gateway_port, processes=o.workers)
            await gen.start()
            self.pids = stack.pids() | {f"loadgen-{i + 1}": p for i, p in enumerate(gen.pids)}
            self.results["processes"] = sorted(self.pids)
            assert stack.nats is not None
            nc = await nats.connect(stack.nats.url)
            try:
                async with aiohttp.ClientSession() as http:
                    online = await self.steps(stack, gen, http)
                    if online:
                        await self.idle()
                        await self.broadcasts(gen, nc.jetstream(), stack, online)
            finally:
                await nc.close()
        finally:
            progress("scale: closing the connections and stopping everything")
            if gen is not None:
                await gen.stop(timeout=20)
            stack.stop()
        self.results["load_after"] = os.getloadavg()
        self.results["fits"] = fits(self.results["steps"], self.o.workers)
        return self.results

    def usage(self) -> dict[str, Usage]:
        return {name: usage(pid) for name, pid in self.pids.items()}

    def specs(self, first: int, count: int) -> list[ClientSpec]:
        out = []
        for i in range(first, first + count):
            tok = mint_token(self.secret, f"scale-{i}", regions=[REGION], ttl_seconds=3600)
            query = f"auth_token={tok}&client_id=bench&ack_mode=client"
            out.append(ClientSpec(f"{WS_PATH}?{query}"))
        return out

    async def held(self, stack: Stack, http: aiohttp.ClientSession) -> dict[str, int]:
        """Each gateway's open connections, from its own /metrics."""
        out = {}
        for child, base in zip(stack.gateways, stack.gateway_urls, strict=True):
            async with http.get(f"{base}/metrics") as r:
                text = await r.text()
            for line in text.splitlines():
                if line.startswith("tocsin_gateway_connections "):
                    out[child.name] = int(float(line.split()[-1]))
        return out

    async def steps(self, stack: Stack, gen: LoadGen, http: aiohttp.ClientSession) -> int:
        o = self.o
        deadline = time.monotonic() + o.limit
        online = 0
        first = 0
        while first < o.devices:
            count = min(o.step, o.devices - first)
            remaining = deadline - time.monotonic()
            if remaining < 5:
                why = f"out of time (--limit {o.limit:g} s) at {online:,} connections"
                self.results["aborted"].append(why)
                progress(f"!! scale: {why}")
                break
            specs = self.specs(first, count)
            before = self.usage()
            t0 = time.monotonic()
            res = await gen.connect(specs, concurrency=o.concurrency, timeout=remaining)
            seconds = time.monotonic() - t0
            after = self.usage()
            online += res.ok
            first += count
            counts: dict[str, int] = {}
            limit = time.monotonic() + COUNT_LIMIT
            while time.monotonic() < limit:  # the gateways count closes a moment later
                counts = await self.held(stack, http)
                if sum(counts.values()) == online:
                    break
                await asyncio.sleep(0.1)
            row = {
                "connections": online,
                "ok": res.ok,
                "failed": res.failed,
                "failures": res.failures,
                "seconds": round(seconds, 2),
                "per_second": round(res.ok / seconds, 1) if seconds else None,
                "handshake_ms": summary(res.established_ms),
                "held_by_gateway": counts,
                "rss_mib": {p: round(u.rss_bytes / 2**20, 1) for p, u in after.items()},
                "cpu_seconds": {
                    p: round(after[p].cpu_seconds - before[p].cpu_seconds, 2) for p in after
                },
            }
            self.results["steps"].append(row)
            progress(
                f"scale: {online:,} held ({res.ok:,} in {seconds:.1f} s, "
                f"{row['per_second']}/s, {res.failed} failed) by gateway: {counts}"
            )
            if res.failed > count // 10:
                why = f"{res.failed} of {count} connects failed at {online:,}: {res.failures}"
                self.results["aborted"].append(why)
                progress(f"!! scale: {why}")
                break
        return online

    async def idle(self) -> None:
        await asyncio.sleep(2.0)  # the last step's handshakes and saves settle
        before = self.usage()
        t0 = time.monotonic()
        await asyncio.sleep(self.o.idle)
        seconds = time.monotonic() - t0
        after = self.usage()
        self.results["idle"] = {
            "seconds": round(seconds, 1),
            "cpu_percent": {
                p: round(100 * (after[p].cpu_seconds - before[p].cpu_seconds) / seconds, 2)
                for p in after
            },
        }

    async def broadcasts(self, gen: LoadGen, js: Any, stack: Stack, online: int) -> None:
        names = Names(stack.namespace)
        lat: list[float] = []
        cpu: list[dict[str, float]] = []
        missing = 0
        for _ in range(self.o.broadcasts):
            await gen.collect()
            start = await gen.received()
            alert = make_alert(f"{REGION}-102")
            before = self.usage()
            sent = time.monotonic_ns()
            await append_alert(js, names, alert)
            got = await settle(gen, start + online, BROADCAST_LIMIT)
            after = self.usage()
            missing += max(0, start + online - got)
            receipts = await gen.collect()
            key = int(alert.alert_id)
            pairs = zip(receipts.alert_ids, receipts.recv_ns, strict=True)
            lat += [(r - sent) / 1e6 for a, r in pairs if a == key]
            cpu.append({p: after[p].cpu_seconds - before[p].cpu_seconds for p in after})
            await asyncio.sleep(1.0)  # the acks land: the next one starts from quiet
        per = {p: round(1000 * sum(c[p] for c in cpu) / len(cpu), 1) for p in cpu[0]} if cpu else {}
        self.results["broadcast"] = {
            "broadcasts": self.o.broadcasts,
            "devices": online,
            "latency_ms": summary(lat),
            "missing": missing,
            "cpu_ms_per_broadcast": per,
        }


def fits(steps: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """What grows with what, per process and per connection *it* holds: a gateway its own
    (its /metrics), a load generator worker its share, nats-server every device's durable.
    RSS: the least-squares slope over the steps; CPU: all the steps' CPU over the
    connections it took on."""
    if not steps:
        return {}
    procs = list(steps[0]["rss_mib"])

    def held(s: dict[str, Any], p: str) -> float:
        if p in s["held_by_gateway"]:
            return float(s["held_by_gateway"][p])
        total = float(s["connections"])
        return total / workers if p.startswith("loadgen") else total

    xs = [float(s["connections"]) for s in steps]
    return {
        "rss_kib_per_connection": {
            p: round(slope([held(s, p) for s in steps], [s["rss_mib"][p] * 1024 for s in steps]), 2)
            for p in procs
        },
        "cpu_ms_per_connect": {
            p: round(
                1000 * sum(s["cpu_seconds"][p] for s in steps) / max(1.0, held(steps[-1], p)), 3
            )
            for p in procs
        },
        "step_seconds_per_1000_held": round(
            1000 * slope(xs, [float(s["seconds"]) for s in steps]), 3
        ),
    }


# ---------------------------------------------------------------- the report


def _order(procs: list[str]) -> list[str]:
    rank = {"gateway": 0, "nats": 1, "loadgen": 2}
    return sorted(procs, key=lambda p: (rank.get(p.split("-")[0], 3), p))


def report(results: dict[str, Any], when: Any, plot: Path | None = None) -> str:
    steps = results["steps"]
    m = results["machine"]
    procs = _order(list(steps[0]["rss_mib"])) if steps else []
    gateways = [p for p in procs if p.startswith("gateway")]
    lines = [
        f"# tocsin bench scale — {when:%Y-%m-%d %H:%M}",
        "",
        f"{m['cpus']} CPUs ({m['cpu_model']}) · {m['nats_server']} · code {results['code']} · "
        + (
            f"{results['gateways']} gateway processes on one port (SO_REUSEPORT), "
            if results["gateways"] > 1
            else "1 gateway process, "
        )
        + f"{results['loadgen_workers']} load generator processes on the same machine · "
        f"heartbeat {results['heartbeat_seconds']:g} s · open files "
        f"{results['limits']['open_files_soft']:,} · ephemeral ports "
        f"{results['limits']['ephemeral_ports']:,} · load average before / after "
        f"{results['load_before'][0]:.1f} / {results.get('load_after', [math.nan])[0]:.1f}",
        "",
    ]
    for why in results["aborted"]:
        lines.append(f"**Stopped early**: {why}")
        lines.append("")
    lines += [
        "## Connect steps: time, and the memory of every process (MiB) once held",
        "",
        "| held | step s | connects/s | handshake p50 / p99 ms | "
        + " | ".join(procs)
        + " | held per gateway |",
        "|" + "---|" * (4 + len(procs) + 1),
    ]
    for s in steps:
        hs = s["handshake_ms"]
        held = " / ".join(f"{s['held_by_gateway'].get(g, 0):,}" for g in gateways)
        lines.append(
            f"| {s['connections']:,} | {s['seconds']:.1f} | {fmt(s['per_second'] or 0.0, 0)} | "
            f"{fmt(hs['p50'])} / {fmt(hs['p99'])} | "
            + " | ".join(fmt(s["rss_mib"][p]) for p in procs)
            + f" | {held} |"
        )
    lines += [
        "",
        "## CPU seconds of every process during each step",
        "",
        "| held | " + " | ".join(procs) + " | servers, ms per connect |",
        "|" + "---|" * (2 + len(procs)),
    ]
    for s in steps:
        server = sum(v for p, v in s["cpu_seconds"].items() if not p.startswith("loadgen"))
        lines.append(
            f"| {s['connections']:,} | "
            + " | ".join(fmt(s["cpu_seconds"][p], 2) for p in procs)
            + f" | {fmt(1000 * server / max(1, s['ok']), 2)} |"
        )
    f = results.get("fits") or {}
    idle = results.get("idle") or {}
    b = results.get("broadcast") or {}
    if steps:
        lines += [
            "",
            "## Per process: what grows with the connections, idle and one broadcast to all",
            "",
            "| figure | " + " | ".join(procs) + " |",
            "|" + "---|" * (1 + len(procs)),
            "| RSS KiB per connection it holds (fit over the steps) | "
            + " | ".join(fmt(f["rss_kib_per_connection"][p]) for p in procs)
            + " |",
            "| CPU ms per connect it handled | "
            + " | ".join(fmt(f["cpu_ms_per_connect"][p], 2) for p in procs)
            + " |",
        ]
        if idle:
            lines.append(
                f"| idle CPU % of a core, {steps[-1]['connections']:,} held, "
                f"{idle['seconds']:g} s | "
                + " | ".join(fmt(idle["cpu_percent"][p], 1) for p in procs)
                + " |"
            )
        if b:
            lines.append(
                "| CPU ms per broadcast to all | "
                + " | ".join(fmt(b["cpu_ms_per_broadcast"].get(p, math.nan), 0) for p in procs)
                + " |"
            )
    if b:
        lat = b["latency_ms"]
        lines += [
            "",
            f"Broadcast to {b['devices']:,} devices ({b['broadcasts']} one at a time): "
            f"publish → receipt p50 {fmt(lat['p50'])} ms, p99 {fmt(lat['p99'])} ms, max "
            f"{fmt(lat['max'])} ms; missing {b['missing']}.",
        ]
    if f:
        lines.append(
            f"Each step's connect time grows by {fmt(f['step_seconds_per_1000_held'], 3)} s "
            "per 1,000 connections already held (least squares)."
        )
    if plot is not None and steps:
        draw(results, plot)
        lines += ["", f"![memory and connect time against connections]({plot.name})"]
    return "\n".join(lines) + "\n"


def draw(results: dict[str, Any], path: Path) -> None:
    import importlib

    importlib.import_module("matplotlib").use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    steps = results["steps"]
    xs = [s["connections"] for s in steps]
    fig, (mem, tm) = plt.subplots(1, 2, figsize=(11, 4))
    for p in _order(list(steps[0]["rss_mib"])):
        mem.plot(xs, [s["rss_mib"][p] for s in steps], marker="o", label=p)
    mem.set_xlabel("connections held")
    mem.set_ylabel("RSS (MiB)")
    mem.set_title("memory of every process")
    tm.plot(xs, [s["seconds"] for s in steps], marker="o", label="step connect time (s)")
    tm.set_xlabel("connections held after the step")
    tm.set_ylabel(f"seconds per {results['step']:,} connects")
    tm.set_title("connect time per step")
    for ax in (mem, tm):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- the command line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="connections held against memory, connect time and CPU of every "
        "process: G gateway processes on one port, devices connected in steps "
        "(docs/benchmarks.md)",
    )
    cores = os.cpu_count() or 1
    parser.add_argument("--devices", type=int, default=25_000, help="default 25,000")
    parser.add_argument("--step", type=int, default=2_500, help="devices per step (2,500)")
    parser.add_argument(
        "--gateways", type=int, default=cores, help=f"gateway processes (default {cores}: cores)"
    )
    parser.add_argument("--workers", type=int, default=2, help="load generator processes (2)")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of the idle window")
    parser.add_argument("--broadcasts", type=int, default=2, help="broadcasts to all (2)")
    parser.add_argument(
        "--limit", type=float, default=480.0, help="seconds for all the connect steps (480)"
    )
    set_option(parser)
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    for flag, value, least in (
        ("--devices", args.devices, 1),
        ("--step", args.step, 1),
        ("--gateways", args.gateways, 1),
        ("--workers", args.workers, 1),
        ("--broadcasts", args.broadcasts, 0),
    ):
        if value < least:
            parser.error(f"{flag}: at least {least}, got {value}")
    if args.gateways > 64:
        parser.error("--gateways: at most 64 (TOCSIN_GATEWAYS)")
    if not 0 < args.idle <= 300 or not 0 < args.limit <= 3600:
        parser.error("--idle: more than 0, at most 300; --limit: more than 0, at most 3600")
    sets = parse_sets(parser, args.set)
    o = Options(
        devices=args.devices,
        step=args.step,
        gateways=args.gateways,
        workers=args.workers,
        idle=args.idle,
        broadcasts=args.broadcasts,
        limit=args.limit,
        gateway_env={f"TOCSIN_{k.upper()}": str(v) for k, v in sets.items()},
    )
    problem = limits_problem(o)
    if problem:
        parser.error(problem)

    def stem(when: Any) -> str:
        return f"scale-{when:%Y-%m-%d-%H%M}-d{o.devices}-g{o.gateways}"

    return run_and_write(
        Scale(o).run(),
        lambda r, when: report(r, when, args.out / f"{stem(when)}.png"),
        args.out,
        stem,
    )


if __name__ == "__main__":
    sys.exit(main())
