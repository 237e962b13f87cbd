"""Hostile clients beside well-behaved ones (issue 11): 50 clients sending garbage, floods,
oversized and binary frames, or never reading (tests/chaos/hostile.py, a process of their
own), beside 50 clients that receive and ack alerts published at 20/s, against one
gateway process with the production limits (60 frames a minute, bursts of 10, a ban
after 3 warnings). Two phases in one run, quiet then hostile: the good clients must get
every alert in both and stay connected; every flooding client must end banned (1008) or
cut (1009 for a frame over 1 MiB; 4000 for the one that never reads), and be refused
(429) when it comes back. The good clients' delivery latency in both phases is printed
(a figure, not an assertion: on a loaded machine it measures the machine).
``TOCSIN_HOSTILE_KINDS=garbage,flood`` runs only those kinds (to see which costs what)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..conftest import SECRET
from ..support import Client, GatewayProcess, alert, append, eventually, token
from .harness import LONG

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(600)]

GOOD = 50
HOSTILE = 50
RATE = 20.0  # alerts per second
SECONDS = 30.0 if LONG else 6.0
REPO = Path(__file__).resolve().parents[2]


async def phase(
    js: JetStreamContext, names: Names, good: list[Client], seconds: float
) -> dict[int, float]:
    """Publish for ``seconds`` at RATE; each alert's seq -> when its PubAck came."""
    sent: dict[int, float] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ack = await append(js, names, alert("KE-30"))
        sent[ack.seq] = time.monotonic()
        await asyncio.sleep(1 / RATE)  # the engine's pace, not a synchronisation
    return sent


async def collect(client: Client, got: dict[int, float]) -> None:
    """Timestamp and ack every alert as it arrives (runs beside the publisher)."""
    while True:
        frame = await client.next("alert", timeout=3600)
        got.setdefault(frame["seq"], time.monotonic())
        await client.send({"type": "ack", "seq": frame["seq"]})


def latencies(sent: dict[int, float], received: list[dict[int, float]]) -> list[float]:
    return [r[s] - t for r in received for s, t in sent.items() if s in r]


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def test_hostile_clients_cost_themselves_their_sockets_not_the_others_latency(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    settings = make_settings(
        heartbeat_seconds=2,
        max_messages_per_minute=60,
        rate_limit_burst=10,
        ban_after_warnings=3,
        ban_duration_minutes=1,
        max_connections_per_user=5,
    )
    gw = gateway_process(settings)
    good = [await Client.connect(gw.ws_url, token(f"good-{i}", ("KE",))) for i in range(GOOD)]
    for c in good:
        await c.next("connection_established")
    figures = {}
    for name, hostile in (("quiet", False), ("hostile", True)):
        received: list[dict[int, float]] = [{} for _ in good]
        attackers = None
        if hostile:
            attackers = await asyncio.create_subprocess_exec(
                "nice",  # an attacker's CPU is elsewhere: here it must not starve the rest
                "-n",
                "19",
                sys.executable,
                "-m",
                "tests.chaos.hostile",
                gw.ws_url,
                SECRET,
                str(HOSTILE),
                str(SECONDS + 4),
                *(
                    [os.environ["TOCSIN_HOSTILE_KINDS"]]
                    if "TOCSIN_HOSTILE_KINDS" in os.environ
                    else []
                ),
                cwd=REPO,
                stdout=asyncio.subprocess.PIPE,
            )
        collectors = [
            asyncio.create_task(collect(c, r)) for c, r in zip(good, received, strict=True)
        ]
        sent = await phase(js, names, good, SECONDS)
        try:
            await eventually(
                lambda: all(sent.keys() <= r.keys() for r in received),  # noqa: B023
                timeout=60,
                what="every good client's alerts",
            )
        finally:
            for task in collectors:
                task.cancel()
            await asyncio.gather(*collectors, return_exceptions=True)
        lat = latencies(sent, received)
        assert len(lat) == len(sent) * GOOD, "a good client missed an alert"
        figures[name] = (p(lat, 50), p(lat, 99), len(sent))
        if attackers is not None:
            out, _ = await asyncio.wait_for(attackers.communicate(), 120)
            outcome = json.loads(out)
    assert not any(c.closed.is_set() for c in good), "a good client was closed"
    print(
        "\n| phase | alerts | good clients' latency p50 | p99 |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {n} | {k} | {a * 1000:.1f} ms | {b * 1000:.1f} ms |"
            for n, (a, b, k) in figures.items()
        )
        + f"\n\nhostile / quiet: p50 {figures['hostile'][0] / figures['quiet'][0]:.2f}x, "
        f"p99 {figures['hostile'][1] / figures['quiet'][1]:.2f}x; hostile outcome {outcome}"
    )
    closed, refused = outcome["closed"], outcome["refused"]
    for kind in ("garbage", "flood", "binary"):
        # banned (1008); on a loaded machine a close whose handshake could not finish while
        # the client kept writing is aborted instead (1006, session.shut): never anything else
        assert "1008" in closed[kind] and set(closed[kind]) <= {"1008", "1006"}, (kind, closed)
        assert refused[kind].get("429"), (kind, refused[kind])  # and refused coming back
    # the 2 MB frame: 1009; the 100 KB ones' errors count too, so a ban (1008), or an
    # abort when the close meets a socket busy with a 100 KB frame (1006); refused after
    assert set(closed["oversized"]) <= {"1006", "1008", "1009"}, closed["oversized"]
    assert refused["oversized"].get("429"), refused["oversized"]
    assert set(closed["deaf"]) <= {"1006", "4000"}, closed["deaf"]  # aborted for silence
    for c in good:
        await c.close()
