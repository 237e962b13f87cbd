"""Dead links: how soon the gateway finds a peer that vanished or stopped reading, and what
such a socket holds meanwhile (issue 16).

One stack (nats-server and a ``tocsin gateway`` process, measured from outside through
``/proc``), heartbeat ``--heartbeat``; ``--devices`` clients in each phase:

* **half-open**: clients connect, receive a few alerts they never ack (the in-flight the
  next connection must get again), then vanish without a FIN: each stops reading its
  socket and sends nothing, so neither a JSON nor a WebSocket pong comes back (what a
  phone in a tunnel looks like from the server). Measured: when the gateway closed each
  (its ``tocsin_gateway_connections`` gauge, sampled every 50 ms), in heartbeats after
  the vanishing; and whether it let go of what they held (its open file descriptors and
  RSS against the same figures before they connected).
* **stuck reader**: clients whose sockets have a 4 KiB receive buffer stop reading but go
  on sending (a bare ``pong`` every half heartbeat, so silence does not close them); then a
  burst of ``--alerts`` alerts of ~``--alert-kib`` KiB for their region. Measured: when the
  gateway cut each (two heartbeats without taking a frame: 4008), and the memory a stuck
  socket held at the peak: the gateway's RSS growth per socket and the kernel's TCP
  memory (``/proc/net/sockstat``, both ends of the loopback connection) per socket.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nats
import orjson

from tocsin.core.naming import Names
from tocsin.gateway.handler import WS_PATH
from tocsin.ingest.pipeline import append_alert

from ..netem import small_window
from ..procs import Stack, usage
from .common import (
    code_version,
    fmt,
    make_alert,
    out_option,
    percentile,
    progress,
    run_and_write,
    server_version,
    token,
)

#: Alerts each half-open client holds unacked when it vanishes.
INFLIGHT = 5
#: The stuck clients' SO_RCVBUF (set before connecting, so the advertised window is small).
RCVBUF = 4096
_GAUGE = re.compile(rb"^tocsin_gateway_connections (\S+)$", re.M)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def tcp_memory() -> int:
    """Bytes of TCP buffer memory the kernel has allocated, system-wide (sockstat's pages)."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            parts = line.split()
            return int(parts[parts.index("mem") + 1]) * _PAGE
    return 0


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass
class Client:
    ws: aiohttp.ClientWebSocketResponse
    alerts: int = 0
    got: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def freeze(self) -> None:
        """Read no more (the socket stays open: no FIN, no RST)."""
        for task in self.tasks:
            task.cancel()
        conn = self.ws._conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def abort(self) -> None:
        conn = self.ws._conn
        if conn is not None and conn.transport is not None:
            conn.transport.abort()


async def reader(client: Client) -> None:
    """Read, answer the JSON pings (aiohttp answers WebSocket pings), count alerts."""
    with contextlib.suppress(Exception):
        async for msg in client.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = orjson.loads(msg.data)
            if frame["type"] == "ping":
                await client.ws.send_str(f'{{"type":"pong","ts":{frame["ts"]}}}')
            elif frame["type"] == "alert":
                client.alerts += 1
                if client.alerts >= client.want:
                    client.got.set()


async def bare_pongs(client: Client, every: float) -> None:
    """Go on sending while reading nothing: the client is there, its socket is not read."""
    with contextlib.suppress(Exception):
        while True:
            await client.ws.send_str('{"type":"pong"}')
            await asyncio.sleep(every)  # the pace of a client's own timer, not a sync


async def connections(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/metrics") as resp:
        match = _GAUGE.search(await resp.read())
    return int(float(match[1])) if match else -1


async def closes(
    http: aiohttp.ClientSession, url: str, start: float, expected: int, limit: float
) -> list[float]:
    """Seconds after ``start`` at which the gateway's open connections fell, one entry per
    connection closed, until ``expected`` closed or ``limit`` seconds passed."""
    first = await connections(http, url)
    times: list[float] = []
    deadline = start + limit
    while len(times) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)  # the sampling period of the gauge
        now = await connections(http, url)
        times += [time.monotonic() - start] * max(0, first - len(times) - now)
    return times


@dataclass
class Run:
    devices: int
    alerts: int
    alert_kib: int
    heartbeat: float
    send_buffer_kib: int
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def limit(self) -> float:
        """How long a phase waits for the closes: three times the two heartbeats they take,
        and a few seconds for a loaded machine. What is not closed by then counts as never."""
        return 6 * self.heartbeat + 5

    async def run(self) -> dict[str, Any]:
        stack = Stack(
            heartbeat=self.heartbeat,
            max_devices=2 * self.devices + 100,
            max_inflight=64,
            extra_env={
                "TOCSIN_WS_COMPRESSION": "off",
                "TOCSIN_WS_SEND_BUFFER_KIB": str(self.send_buffer_kib),
            },
        )
        await asyncio.to_thread(stack.start)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        small = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, socket_factory=small_window(RCVBUF))
        )
        clients: list[Client] = []
        try:
            assert stack.nats is not None
            nc = await nats.connect(stack.nats.url)
            try:
                js = nc.jetstream()
                await self._half_open(stack, http, js, clients)
                await self._stuck(stack, small, http, js, clients)
            finally:
                await nc.close()
        finally:
            for c in clients:
                c.abort()
            await small.close()
            await http.close()
            await asyncio.to_thread(stack.stop)
        self.results["send_buffer_kib"] = self.send_buffer_kib
        return self.results

    async def _connect(
        self, stack: Stack, http: aiohttp.ClientSession, user: str, region: str, ack: str
    ) -> Client:
        params = {
            "auth_token": token(stack.secret, user, regions=(region,)),
            "client_id": "bench",
            "ack_mode": ack,
        }
        url = f"ws://127.0.0.1:{stack.gateway_port}{WS_PATH}"
        ws = await http.ws_connect(url, params=params, compress=0)
        hello = orjson.loads((await ws.receive(timeout=60)).data)
        assert hello["type"] == "connection_established", hello
        return Client(ws)

    async def _many(
        self, stack: Stack, http: aiohttp.ClientSession, prefix: str, region: str, ack: str
    ) -> list[Client]:
        gate = asyncio.Semaphore(100)

        async def one(i: int) -> Client:
            async with gate:
                c = await self._connect(stack, http, f"{prefix}{i}", region, ack)
            c.tasks.append(asyncio.create_task(reader(c)))
            return c

        return list(await asyncio.gather(*(one(i) for i in range(self.devices))))

    async def _half_open(
        self, stack: Stack, http: aiohttp.ClientSession, js: Any, all_: list[Client]
    ) -> None:
        progress(f"deadlinks: half-open, {self.devices} devices")
        pid = stack.pids()["gateway"]
        fds0, rss0 = open_fds(pid), usage(pid).rss_bytes
        clients = await self._many(stack, http, "tunnel", "KE", "client")
        all_ += clients
        for c in clients:
            c.want = INFLIGHT
        for _ in range(INFLIGHT):
            await append_alert(js, Names(stack.namespace), make_alert("KE-30"))
        await asyncio.wait_for(asyncio.gather(*(c.got.wait() for c in clients)), 120)
        fds1, rss1 = open_fds(pid), usage(pid).rss_bytes
        start = time.monotonic()
        for c in clients:
            c.freeze()
        times = await closes(http, stack.http, start, len(clients), self.limit)
        for c in clients:
            c.abort()  # the client side of a dead link is gone too
        fds2 = await _settled(lambda: open_fds(pid), fds0)
        self.results["half_open"] = {
            "closed": len(times),
            "seconds_p50": percentile(times, 50) if times else None,
            "seconds_max": max(times) if times else None,
            "fds": [fds0, fds1, fds2],
            "rss_kib": [rss0 / 1024, rss1 / 1024, usage(pid).rss_bytes / 1024],
        }

    async def _stuck(
        self,
        stack: Stack,
        small: aiohttp.ClientSession,
        http: aiohttp.ClientSession,
        js: Any,
        all_: list[Client],
    ) -> None:
        progress(f"deadlinks: stuck readers, {self.devices} devices")
        pid = stack.pids()["gateway"]
        clients = await self._many(stack, small, "stuck", "UG", "auto")
        all_ += clients
        for c in clients:
            c.freeze()
            c.tasks = [asyncio.create_task(bare_pongs(c, self.heartbeat / 2))]
        rss0, tcp0 = usage(pid).rss_bytes, tcp_memory()
        padding = "x" * (self.alert_kib * 1024)
        names = Names(stack.namespace)
        start = time.monotonic()
        for i in range(self.alerts):
            await append_alert(js, names, make_alert("UG-1", message=f"{i} {padding}"[:8000]))
        peak = {"rss": rss0, "tcp": tcp0}

        async def sample() -> None:
            while True:
                peak["rss"] = max(peak["rss"], usage(pid).rss_bytes)
                peak["tcp"] = max(peak["tcp"], tcp_memory())
                await asyncio.sleep(0.1)  # the sampling period

        sampler = asyncio.create_task(sample())
        try:
            times = await closes(http, stack.http, start, len(clients), self.limit)
        finally:
            sampler.cancel()
        n = len(clients)
        self.results["stuck"] = {
            "closed": len(times),
            "seconds_p50": percentile(times, 50) if times else None,
            "seconds_max": max(times) if times else None,
            "burst_bytes": self.alerts * (self.alert_kib * 1024 + 400),
            "rss_kib_per_socket": (peak["rss"] - rss0) / n / 1024,
            "kernel_tcp_kib_per_socket": (peak["tcp"] - tcp0) / n / 1024,
        }


async def _settled(read: Any, target: int, limit: float = 10.0) -> int:
    """``read()`` once it is back at ``target`` or after ``limit`` seconds, whichever first."""
    deadline = time.monotonic() + limit
    value: int = read()
    while value > target and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = read()
    return value


async def run(
    devices: int, alerts: int, alert_kib: int, heartbeat: float, send_buffers: list[int]
) -> dict[str, Any]:
    runs = []
    for kib in send_buffers:
        progress(f"deadlinks: TOCSIN_WS_SEND_BUFFER_KIB={kib}")
        runs.append(await Run(devices, alerts, alert_kib, heartbeat, kib).run())
    return {
        "code": code_version(),
        "nats_server": server_version(),
        "devices": devices,
        "alerts": alerts,
        "heartbeat_seconds": heartbeat,
        "max_inflight": 64,
        "runs": runs,
    }


def report(results: dict[str, Any], when: dt.datetime) -> str:
    hb = results["heartbeat_seconds"]
    n = results["devices"]

    def beats(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} s ({x / hb:.2f} hb)"

    def buffer(kib: int) -> str:
        return "kernel autotuning" if kib == 0 else f"{kib} KiB"

    lines = [
        f"# tocsin bench deadlinks, {when:%Y-%m-%d %H:%M}",
        "",
        f"{n} devices per phase, heartbeat {hb:g} s, window {results['max_inflight']}, one "
        f"gateway process; code {results['code']}, nats-server {results['nats_server']}.",
        "",
        "| TOCSIN_WS_SEND_BUFFER_KIB | phase | closed by the gateway | after (p50) | after (max) "
        "| held |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["runs"]:
        h, s = r["half_open"], r["stuck"]
        lines += [
            f"| {buffer(r['send_buffer_kib'])} | half-open ({INFLIGHT} unacked each) | "
            f"{h['closed']}/{n} | {beats(h['seconds_p50'])} | {beats(h['seconds_max'])} | "
            f"gateway fds {h['fds'][0]} before, {h['fds'][1]} connected, {h['fds'][2]} after |",
            f"| {buffer(r['send_buffer_kib'])} | stuck reader ({results['alerts']} alerts, "
            f"{s['burst_bytes']:,} bytes each) | {s['closed']}/{n} | {beats(s['seconds_p50'])} "
            f"| {beats(s['seconds_max'])} | per socket at the peak: gateway RSS "
            f"{fmt(s['rss_kib_per_socket'])} KiB, kernel TCP buffers "
            f"{fmt(s['kernel_tcp_kib_per_socket'])} KiB (both ends) |",
        ]
    lines += [
        "",
        "Half-open: from the moment the clients stopped reading and sending (no FIN) to the "
        "gateway closing them (4000); a dead link is found two heartbeats after the last "
        "frame it sent, plus up to a second of the ticker's sweep. Stuck reader (ack_mode "
        "auto, SO_RCVBUF 4 KiB, bare pongs every half heartbeat): from the start of the burst "
        "to the cut (4008: two heartbeats without the socket taking a frame). n/a: not cut "
        "within six heartbeats and 5 s.",
    ]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Dead links: detection time of vanished peers and stuck readers, and "
        "the memory a stuck socket holds (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=0, help="per phase (default 500; quick 100)")
    parser.add_argument("--alerts", type=int, default=100, help="burst to stuck readers")
    parser.add_argument(
        "--alert-kib",
        type=int,
        default=7,
        help="padding per alert, KiB (at most 7: message's limit)",
    )
    parser.add_argument("--heartbeat", type=float, default=5.0, help="TOCSIN_HEARTBEAT_SECONDS")
    parser.add_argument(
        "--send-buffers",
        default="0,256",
        help="TOCSIN_WS_SEND_BUFFER_KIB values, one stack each (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="100 devices, 2 s heartbeat")
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.devices <= 5_000:
        parser.error("--devices must be between 1 and 5,000")
    if not 1 <= args.alerts <= 1_000:
        parser.error("--alerts must be between 1 and 1,000")
    if not 1 <= args.alert_kib <= 7:
        parser.error("--alert-kib must be between 1 and 7 (an alert's message holds 8,000)")
    if not 0.5 <= args.heartbeat <= 60:
        parser.error("--heartbeat must be between 0.5 and 60 seconds")
    try:
        send_buffers = [int(v) for v in args.send_buffers.split(",")]
    except ValueError:
        parser.error(f"--send-buffers: comma-separated KiB, got {args.send_buffers!r}")
    if not send_buffers or not all(0 <= v <= 65536 for v in send_buffers):
        parser.error("--send-buffers: each between 0 and 65536")
    devices = args.devices or (100 if args.quick else 500)
    heartbeat = 2.0 if args.quick and args.heartbeat == 5.0 else args.heartbeat
    return run_and_write(
        run(devices, args.alerts, args.alert_kib, heartbeat, send_buffers),
        report,
        args.out,
        lambda when: f"deadlinks-{when:%Y-%m-%d}" + ("-quick" if args.quick else ""),
    )


if __name__ == "__main__":
    sys.exit(main())
