"""Compression benchmark: what permessage-deflate costs the gateway and saves on the wire,
with clients that offer it as browsers and the ``websockets`` library always do.

Each mode is one stack of its own (nats-server and a ``tocsin gateway`` process, measured
from outside through ``/proc``): ``TOCSIN_WS_COMPRESSION`` on or off, clients offering
permessage-deflate (``compress=15``, context takeover, as a browser asks) or not. Per mode:

* **memory**: the gateway's RSS after every client is established, minus before, per
  connection;
* **burst**: ``--alerts`` alerts appended at once, each to every device; gateway and
  nats-server CPU per delivery, and the bytes each client's socket received per delivery;
* **heartbeats**: idle, with pings every ``--heartbeat`` s (default ``HEARTBEAT``); bytes
  per ping and pong, and what that makes per connection-hour at the default 30 s heartbeat;
* **reconnect**: one device away while 100 alerts are queued for it (for its region
  only), then back: the bytes its new connection received, handshake to last alert.

Bytes are the kernel's count for each client socket (``TCP_INFO``: ``tcpi_bytes_received``
and ``tcpi_bytes_acked``): TCP payload, i.e. the HTTP upgrade and WebSocket frames, without
TCP/IP headers (add ~52 bytes per segment for those).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import nats
import orjson

from tocsin.core.naming import Names
from tocsin.gateway.handler import WS_PATH
from tocsin.ingest.pipeline import append_alert

from ..procs import Stack, Usage, usage
from .common import (
    code_version,
    fmt,
    make_alert,
    out_option,
    progress,
    run_and_write,
    server_version,
    token,
)

#: Pings every this many seconds during the run (the heartbeat phase counts them); short
#: enough for a quick idle phase, long enough that pongs late behind a burst of 2,000
#: compressed sockets (the clients share one process) close nothing.
HEARTBEAT = 5.0
#: Heartbeats the idle phase lasts.
IDLE_HEARTBEATS = 3
#: The default heartbeat, for the per-hour figure.
DEFAULT_HEARTBEAT = 30.0
#: Alerts queued for the device of the reconnect phase.
QUEUED = 100
#: The modes: (name, TOCSIN_WS_COMPRESSION, clients offer permessage-deflate, clients ask
#: with compression=deflate). "client" with clients that offer but do not ask is a browser
#: against the default: the same as off.
MODES = (
    ("off, offered", "off", True, False),
    ("on, offered", "on", True, False),
    ("client, asked", "client", True, True),
    ("off, not offered", "off", False, False),
)


#: struct tcp_info (linux/tcp.h): the offsets of tcpi_bytes_acked and tcpi_bytes_received
#: (u64 each; Linux 4.1+), and enough of the struct to hold both.
_ACKED, _RECEIVED, _TCP_INFO_LEN = 120, 128, 136


def tcp_bytes(ws: aiohttp.ClientWebSocketResponse) -> tuple[int, int]:
    """(received, sent and acknowledged) TCP payload bytes of a client's socket."""
    sock = ws.get_extra_info("socket")
    if sock is None:
        return 0, 0
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCP_INFO_LEN:
        return 0, 0
    return (
        int.from_bytes(info[_RECEIVED : _RECEIVED + 8], "little"),
        int.from_bytes(info[_ACKED : _ACKED + 8], "little"),
    )


def delta(devices: list[Device], before: list[tuple[int, int]]) -> tuple[int, int, int]:
    """Bytes received and sent since ``before`` (from :func:`sample`) summed over the
    devices still connected, and how many are no longer (their counters are gone)."""
    received = sent = gone = 0
    for d, (r0, s0) in zip(devices, before, strict=True):
        r1, s1 = tcp_bytes(d.ws)
        if d.ws.closed or r1 < r0:
            gone += 1
            continue
        received, sent = received + r1 - r0, sent + s1 - s0
    return received, sent, gone


def sample(devices: list[Device]) -> list[tuple[int, int]]:
    return [tcp_bytes(d.ws) for d in devices]


@dataclass
class Device:
    ws: aiohttp.ClientWebSocketResponse
    alerts: int = 0
    negotiated: bool = False
    got: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 0


@dataclass
class Mode:
    name: str
    server: str
    offer: bool
    ask: bool
    devices: int
    alerts: int
    heartbeat: float = HEARTBEAT
    results: dict[str, Any] = field(default_factory=dict)

    async def run(self) -> dict[str, Any]:
        stack = Stack(
            heartbeat=self.heartbeat,
            max_devices=self.devices + 100,
            max_inflight=max(64, 2 * self.alerts),
            extra_env={
                "TOCSIN_WS_COMPRESSION": self.server,
                "TOCSIN_OFFLINE_QUEUE_MAX": str(10 * QUEUED),
            },
        )
        await asyncio.to_thread(stack.start)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        devices: list[Device] = []
        readers: list[asyncio.Task[None]] = []
        try:
            assert stack.nats is not None
            nc = await nats.connect(stack.nats.url)
            try:
                await self._measure(stack, http, nc.jetstream(), devices, readers)
            finally:
                await nc.close()
        finally:
            for task in readers:
                task.cancel()
            for d in devices:
                with contextlib.suppress(Exception):
                    await d.ws.close()
            await http.close()
            await asyncio.to_thread(stack.stop)
        return self.results

    async def connect(
        self, stack: Stack, http: aiohttp.ClientSession, user: str, region: str
    ) -> Device:
        url = f"ws://127.0.0.1:{stack.gateway_port}{WS_PATH}"
        params = {
            "auth_token": token(stack.secret, user, regions=(region,)),
            "client_id": "bench",
            "ack_mode": "auto",
        }
        if self.ask:
            params["compression"] = "deflate"
        ws = await http.ws_connect(url, params=params, compress=15 if self.offer else 0)
        hello = orjson.loads((await ws.receive(timeout=60)).data)
        assert hello["type"] == "connection_established", hello
        return Device(ws, negotiated=ws.compress != 0)

    async def _measure(
        self,
        stack: Stack,
        http: aiohttp.ClientSession,
        js: Any,
        devices: list[Device],
        readers: list[asyncio.Task[None]],
    ) -> None:
        names = Names(stack.namespace)
        pid = stack.pids()["gateway"]
        nats_pid = stack.pids()["nats-server"]
        r = self.results
        r.update(
            mode=self.name,
            server=self.server,
            offered=self.offer,
            asked=self.ask,
            devices=self.devices,
        )

        # memory
        before = usage(pid)
        gate = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with gate:
                d = await self.connect(stack, http, f"u{i}", "KE")
            devices.append(d)  # read (and answer pings) from the start: heartbeats are short
            readers.append(asyncio.create_task(self._pong_reader(d)))

        await asyncio.gather(*(one(i) for i in range(self.devices)))
        lost = [d for d in devices if d.ws.closed]
        assert not lost, f"{len(lost)} connections closed while the others connected"
        after = usage(pid)
        r["negotiated"] = sum(d.negotiated for d in devices)
        r["rss_per_connection_kib"] = (after.rss_bytes - before.rss_bytes) / self.devices / 1024

        # burst
        for d in devices:
            d.want, d.alerts = self.alerts, 0
            d.got.clear()
        rng = random.Random(self.alerts)  # the same alerts in every mode
        alerts = [varied_alert(rng, "KE") for _ in range(self.alerts)]
        r["alert_json_bytes"] = sum(len(a.model_dump_json()) for a in alerts) / len(alerts)
        u0, n0, io0 = usage(pid), usage(nats_pid), sample(devices)
        started = time.monotonic()
        for a in alerts:
            await append_alert(js, names, a)
        await asyncio.wait_for(asyncio.gather(*(d.got.wait() for d in devices)), 300)
        seconds = time.monotonic() - started
        u1, n1 = usage(pid), usage(nats_pid)
        received, _, gone = delta(devices, io0)
        deliveries = self.devices * self.alerts
        r["burst"] = {
            "deliveries": deliveries,
            "seconds": seconds,
            "deliveries_per_s": deliveries / seconds,
            "gateway_us_per_delivery": _us(u0, u1, deliveries),
            "nats_us_per_delivery": _us(n0, n1, deliveries),
            "bytes_per_delivery": received / (deliveries - gone * self.alerts),
        }

        # heartbeats: idle for a few heartbeats
        io0, t0 = sample(devices), time.monotonic()
        await asyncio.sleep(IDLE_HEARTBEATS * self.heartbeat)  # the phase itself: idle
        t1 = time.monotonic()
        received, sent, gone_idle = delta(devices, io0)
        gone = max(gone, gone_idle)  # those closed in the burst are counted again here
        pings = (self.devices - gone) * (t1 - t0) / self.heartbeat
        per_ping_out = received / pings
        per_pong_in = sent / pings
        per_hour = 3600 / DEFAULT_HEARTBEAT
        r["heartbeat"] = {
            "bytes_per_ping": per_ping_out,
            "bytes_per_pong_read": per_pong_in,
            "bytes_per_connection_hour": (per_ping_out + per_pong_in) * per_hour,
        }

        # reconnect with QUEUED alerts waiting
        away = await self.connect(stack, http, "traveller", "TZ")
        await away.ws.close()
        for _ in range(QUEUED):
            await append_alert(js, names, varied_alert(rng, "TZ-1"))
        back = await self.connect(stack, http, "traveller", "TZ")
        back.want = QUEUED
        reader = asyncio.create_task(self._pong_reader(back))
        try:
            await asyncio.wait_for(back.got.wait(), 120)
            received = tcp_bytes(back.ws)[0]  # the whole connection: upgrade, hello, backlog
        finally:
            reader.cancel()
            await back.ws.close()
        r["reconnect"] = {"queued": QUEUED, "bytes": received}
        r["closed_early"] = gone  # connections lost during the run (left out of the sums)

    @staticmethod
    async def _pong_reader(device: Device) -> None:
        with contextlib.suppress(Exception):
            async for msg in device.ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                frame = orjson.loads(msg.data)
                if frame["type"] == "ping":
                    await device.ws.send_str(f'{{"type":"pong","ts":{frame["ts"]}}}')
                elif frame["type"] == "alert":
                    device.alerts += 1
                    if device.alerts >= device.want:
                        device.got.set()


#: What varies between alerts, so that compression with context takeover is not flattered
#: by twenty copies of one alert.
_LEVELS = ("low", "medium", "high", "critical")
_EVENTS = ("outbreak risk rising", "cases above threshold", "rainfall anomaly", "stock-out")
_WORDS = (
    "malaria cases clinic district week rainfall vector nets spraying larval sites "
    "facility reports positivity rate children under five referral stock RDT ACT"
).split()


def varied_alert(rng: random.Random, region: str) -> Any:
    """An alert whose title, message, level, score and place differ from the next one's."""
    district = f"{region}-{rng.randint(1, 47)}" if "-" not in region else region
    message = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(12, 30)))
    return make_alert(
        district,
        alert_level=rng.choice(_LEVELS),
        title=f"{rng.choice(_EVENTS).capitalize()} in {district}",
        message=f"{message} ({rng.randint(2, 400)} cases, week {rng.randint(1, 52)})",
        risk_score=round(rng.random(), 3),
        location={
            "region": district,
            "lat": round(rng.uniform(-4.7, 5.0), 4),
            "lon": round(rng.uniform(33.9, 41.9), 4),
        },
    )


def _us(a: Usage, b: Usage, n: int) -> float:
    return (b.cpu_seconds - a.cpu_seconds) / n * 1e6


async def run(devices: int, alerts: int, heartbeat: float = HEARTBEAT) -> dict[str, Any]:
    out: dict[str, Any] = {
        "code": code_version(),
        "nats_server": server_version(),
        "devices": devices,
        "alerts": alerts,
        "heartbeat_seconds": heartbeat,
        "modes": [],
    }
    for name, server, offer, ask in MODES:
        progress(f"compression: {name}, {devices} devices")
        mode = Mode(name, server, offer, ask, devices, alerts, heartbeat)
        out["modes"].append(await mode.run())
    return out


def report(results: dict[str, Any], when: dt.datetime) -> str:
    modes = results["modes"]
    base = next(m for m in modes if m["mode"] == "off, offered")
    lines = [
        f"# tocsin bench compression, {when:%Y-%m-%d %H:%M}",
        "",
        f"{results['devices']} devices, a burst of {results['alerts']} alerts to each, one "
        f"gateway process; code {results['code']}, nats-server {results['nats_server']}.",
        "",
        "| TOCSIN_WS_COMPRESSION, clients | compressed | gateway RSS / conn (KiB) | "
        "deliveries/s | gateway µs / delivery | nats-server µs / delivery | bytes / delivery "
        "| × off | bytes / connection-hour of heartbeats | reconnect with 100 queued (bytes) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in modes:
        b, h = m["burst"], m["heartbeat"]
        ratio = b["bytes_per_delivery"] / base["burst"]["bytes_per_delivery"]
        lines.append(
            f"| {m['mode']} | {m['negotiated']}/{m['devices']} | "
            f"{fmt(m['rss_per_connection_kib'])} | {fmt(b['deliveries_per_s'], 0)} | "
            f"{fmt(b['gateway_us_per_delivery'])} | {fmt(b['nats_us_per_delivery'])} | "
            f"{fmt(b['bytes_per_delivery'], 0)} | {ratio:.2f} | "
            f"{fmt(h['bytes_per_connection_hour'], 0)} | {m['reconnect']['bytes']:,} |"
        )
    lines += [
        "",
        "Alerts differ in title, message, level, score, district and point (random, the "
        f"same in every mode); their JSON is {base['alert_json_bytes']:.0f} bytes on average. "
        "Bytes are TCP payload as the kernel counted it on each client socket (TCP_INFO): "
        "WebSocket frames (and, for the reconnect, the HTTP upgrade) without TCP/IP headers. "
        "Heartbeats: pings in and pongs out, per hour at the default "
        f"{DEFAULT_HEARTBEAT:g} s heartbeat, measured idle at {results['heartbeat_seconds']:g} s.",
    ]
    lost = {m["mode"]: m["closed_early"] for m in modes if m["closed_early"]}
    if lost:
        lines += ["", f"Connections lost during the run, left out of the sums: {lost}."]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Compression benchmark: permessage-deflate on and off with clients that "
        "offer it, and clients that do not (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=0, help="devices (default 2,000; quick 300)")
    parser.add_argument("--alerts", type=int, default=20, help="alerts in the burst (default 20)")
    parser.add_argument(
        "--heartbeat",
        type=float,
        default=HEARTBEAT,
        help="TOCSIN_HEARTBEAT_SECONDS of the run (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="300 devices")
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 0 <= args.devices <= 10_000:
        parser.error("--devices must be between 1 and 10,000")
    if not 1 <= args.alerts <= 1_000:
        parser.error("--alerts must be between 1 and 1,000")
    if not 0.5 <= args.heartbeat <= 60:
        parser.error("--heartbeat must be between 0.5 and 60 seconds")
    devices = args.devices or (300 if args.quick else 2_000)
    return run_and_write(
        run(devices, args.alerts, args.heartbeat),
        report,
        args.out,
        lambda when: f"compression-{when:%Y-%m-%d}" + ("-quick" if args.quick else ""),
    )


if __name__ == "__main__":
    sys.exit(main())
