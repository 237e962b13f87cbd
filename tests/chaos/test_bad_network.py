"""Bad networks (issue 16): every device talks to the gateway through its own shaping link.

Each device's connections, reconnects included, go through one
:class:`tocsin.bench.netem.Link` (so they share its state: a device in a dead zone stays
in it when it reconnects), with one profile per scenario:

* ``2g``: 300 ms each way, 30 KB/s each way, random stalls (2–10 s in ``make chaos``,
  1–3 s in ``make test``) in which bytes are held and then released in order;
* ``dead_zone``: now and then the link blackholes everything, both ways, no FIN nor reset
  (30–120 s; 3–5 s), then resumes in order;
* ``flapping``: every few seconds (2–6 s; 1–3 s) both sides of every connection are reset;
  new connections work at once.

Clients behave as an SDK will (harness :class:`~tests.chaos.harness.Backoff`): they
reconnect with exponential backoff and full jitter (capped at 30 s; 2 s in ``make
test``), honour close codes (4009: never again; 1001: soon; 4401: a new token), and give
up on a connection from which nothing came for two heartbeats (the server pings every
``heartbeat_interval``). The verifier must find nothing lost, nothing out of order,
nothing misdelivered, and **no alert frame sent twice on one connection** (its
``repeats_on_connection``, one of ``Report.failures()``). Each scenario prints the figures
of :mod:`tests.chaos.badnet` (time to deliver, duplicates per delivery, how fast each side
found a dead link, bytes on the wire per delivered alert). ``make chaos`` adds
``flapping_minute_reset``: the flapping link with the backoff reset only after a
connection stayed up a minute, the rule protocol §7 had before this comparison (in
docs/reliability.md) made it reset at every ``connection_established``.

The gateway's settings are chosen so that a slow link is not taken for a dead one:

* **heartbeat** (``heartbeat_seconds``): the server closes a client it heard nothing from
  for two heartbeats (4000), and one whose socket took no frame for two (4008); the client
  gives up after two silent heartbeats as well. A stall of S seconds on a link of one-way
  latency L silences both sides for up to S + 2L after the last ping, so two heartbeats must
  exceed the longest stall with room to spare: 10 s for stalls of up to 10 s (3 s for 3 s
  in ``make test``). A dead zone has no stall to tolerate, so its heartbeat is short (5 s;
  1 s) and the detection time is two of them.
* **max_inflight** stays the default 64 (the suite's other scenarios use 10,000 for clients
  that never ack): the window is what a session may have on the wire unacked, 64 alerts of
  ~650 bytes, about 1.4 s of a 30 KB/s link. A larger one fills the link's and the kernel's
  buffers, and a ping queued behind them arrives late (bufferbloat).
* **ack_timeout_seconds** stays the default 30: a window held full with no ack for that long
  is closed with 4408. On a 2G link an ack comes at the latest a stall plus a round trip
  plus the time to move a window (10 + 0.6 + 1.4 s), well inside it.

Devices ack (``ack_mode=client``) on the dead zone and flapping links: an ``auto`` device
counts what the gateway wrote to a socket as delivered (docs/protocol.md §5), so a link cut with
alerts on the wire loses them by design. On ``2g`` nothing is cut, so the ``auto`` devices
stay: they must lose nothing in a stall.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from tocsin.bench.netem import Profile, profile

from .badnet import figures
from .harness import LONG, Backoff, link_outages, run_scenario
from .harness import MODE as CHAOS_MODE
from .test_chaos import PROFILES, check, copies
from .verifier import DeviceSpec

#: The suite's mode; short: 8 s of load at 20 alerts/s (links need a few seconds to
#: misbehave); long: a longer drain (a dead zone's clients back off up to 30 s).
MODE = (
    replace(CHAOS_MODE, drain_seconds=120.0)
    if LONG
    else replace(CHAOS_MODE, load_seconds=8.0, rate=20.0, max_alerts=400)
)


@dataclass(frozen=True)
class Case:
    link: Profile
    heartbeat: float
    backoff: Backoff
    client_acks_only: bool


def case(name: str) -> Case:
    if LONG:
        backoff = Backoff(0.5, 30.0, 0.0)  # reset at every connection_established
        return {
            "2g": Case(profile("2g"), 10.0, backoff, False),
            "dead_zone": Case(profile("dead_zone"), 5.0, backoff, True),
            "flapping": Case(profile("flapping"), 5.0, backoff, True),
            # the earlier rule: the backoff reset only after a minute up
            "flapping_minute_reset": Case(
                profile("flapping"), 5.0, replace(backoff, stable=60.0), True
            ),
        }[name]
    backoff = Backoff(0.1, 2.0, 0.0)
    return {
        "2g": Case(profile("2g", every=(2.0, 4.0), lasting=(1.0, 3.0)), 3.0, backoff, False),
        "dead_zone": Case(
            profile("dead_zone", every=(1.0, 3.0), lasting=(3.0, 5.0)), 1.0, backoff, True
        ),
        "flapping": Case(profile("flapping", every=(1.0, 3.0)), 2.0, backoff, True),
    }[name]


def specs(client_acks_only: bool) -> list[DeviceSpec]:
    return copies([replace(s, ack_mode="client") if client_acks_only else s for s in PROFILES])


pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.timeout(MODE.timeout + 120)]


#: ``make chaos`` also runs the flapping link with the earlier backoff rule (reset after a
#: minute up; docs/reliability.md, Bad networks).
NAMES = ["2g", "dead_zone", "flapping"] + (["flapping_minute_reset"] if LONG else [])


@pytest.mark.parametrize("name", NAMES)
async def test_bad_network(tmp_path: Path, name: str) -> None:
    c = case(name)
    overrides: dict[str, Any] = {
        "heartbeat_seconds": c.heartbeat,
        "ack_timeout_seconds": 30.0,
        "max_inflight": 64,
    }
    outcome = await run_scenario(
        f"bad_network_{name}",
        tmp_path,
        specs(c.client_acks_only),
        [link_outages(MODE.load_seconds)],
        mode=MODE,
        load_after_faults=2.0,
        overrides=overrides,
        netem=c.link,
        backoff=c.backoff,
    )
    net = figures(name, outcome)  # the figures of docs/reliability.md, Bad networks
    print(f"\nbad network {name}\n{net.table()}")
    check(outcome)
    assert outcome.report.repeats_on_connection == 0
    assert [x.stopped_by for x in outcome.clients if x.stopped_by is not None] == []
    assert net.holds + net.cuts > 0  # the link did misbehave
    if name == "dead_zone":
        # a blackhole longer than two heartbeats is found by both sides
        assert net.server_detect and net.client_detect
