"""Figures of a bad-network scenario (tests/chaos/test_bad_network.py), from the verifier's
records and the counters of every device's link (tocsin.bench.netem).

* **time to deliver**: first receipt minus PubAck, per device and alert, p50 / p99 / max;
* **duplicates per delivery**: every extra alert frame (raw) over the deliveries;
* **detection of a dead link**, from each hold (blackhole or stall) of a device's link:
  server side, to the first time the gateway ended a connection that was open through the
  link when the hold began (as the link read it: the gateway's FIN or reset), and to its
  last bytes before that end (its close frame: when it gave up); client side, to the first
  time the client gave up on its silent connection. Holds nobody noticed (short stalls, as
  they should be) are counted apart;
* **bytes per delivered alert**: bytes the links carried, both ways (WebSocket frames,
  pings, acks, handshakes), over the deliveries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tocsin.bench.netem import Link, Outage
from tocsin.bench.scenarios.common import percentile

from .harness import DeviceClient, Outcome


@dataclass
class NetFigures:
    profile: str
    mode: str
    devices: int
    delivered: int  # (device, alert) first receipts
    p50: float
    p99: float
    worst: float
    dupes_raw: int
    bytes_total: int
    connections: int  # through the links, refused handshakes and reconnects included
    cuts: int
    holds: int
    server_detect: list[float] = field(default_factory=list)  # its socket ended
    server_gave_up: list[float] = field(default_factory=list)  # its close frame
    client_detect: list[float] = field(default_factory=list)
    #: holds during which the server / the client ended nothing (an outage that went by)
    server_missed: int = 0
    client_missed: int = 0

    @property
    def dupes_per_delivery(self) -> float:
        return self.dupes_raw / self.delivered if self.delivered else math.nan

    @property
    def bytes_per_alert(self) -> float:
        return self.bytes_total / self.delivered if self.delivered else math.nan

    def row(self) -> dict[str, str]:
        def spread(values: list[float]) -> str:
            if not values:
                return "-"
            return f"{percentile(values, 50):.1f} / {max(values):.1f} s ({len(values)})"

        return {
            "profile": f"{self.profile} ({self.mode})",
            "deliveries": str(self.delivered),
            "deliver p50 / p99 / max": f"{self.p50:.2f} / {self.p99:.2f} / {self.worst:.2f} s",
            "duplicates per delivery": f"{self.dupes_per_delivery:.3f}",
            "holds / cuts": f"{self.holds} / {self.cuts}",
            "dead link: server gave up (p50 / max)": spread(self.server_gave_up),
            "dead link: server socket ended": spread(self.server_detect),
            "dead link: client gave up": spread(self.client_detect),
            "holds unnoticed, server / client": f"{self.server_missed} / {self.client_missed}",
            "bytes on the wire per delivery": f"{self.bytes_per_alert:,.0f}",
            "connections through the links": str(self.connections),
        }

    def table(self) -> str:
        row = self.row()
        width = max(map(len, row))
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in row.items())


def server_detection(link: Link, hold: Outage) -> tuple[float, float] | None:
    """Seconds from the hold's start to the gateway's last bytes on, and to its end of, a
    connection that was open through the link when the hold began (ended during the hold);
    None: it ended none."""
    end = hold.end if hold.end is not None else math.inf
    found = [
        (c.server_closed - hold.start, (c.server_last or c.server_closed) - hold.start)
        for c in link.conns
        if c.upstream is not None
        and c.upstream < hold.start
        and c.server_closed is not None
        and hold.start <= c.server_closed <= end
        and (c.client_closed is None or c.client_closed >= hold.start)
    ]
    return min(found, default=None)


def client_detection(client: DeviceClient, hold: Outage) -> float | None:
    end = hold.end if hold.end is not None else math.inf
    found = [at - hold.start for at in client.dead_links if hold.start <= at <= end]
    return min(found, default=None)


def figures(profile: str, outcome: Outcome) -> NetFigures:
    v, report = outcome.verifier, outcome.report
    delays = v.delays_of()
    links = [(c, c.netlink) for c in outcome.clients if c.netlink is not None]
    out = NetFigures(
        profile,
        report.mode,
        len(outcome.clients),
        len(delays),
        percentile(delays, 50),
        percentile(delays, 99),
        max(delays, default=math.nan),
        report.dupes_raw,
        sum(link.bytes_up + link.bytes_down for _, link in links),
        sum(link.connections for _, link in links),
        sum(link.cuts for _, link in links),
        sum(1 for _, link in links for o in link.outages if o.kind != "cut"),
    )
    for client, link in links:
        for hold in link.outages:
            if hold.kind == "cut":
                continue
            server = server_detection(link, hold)
            if server is None:
                out.server_missed += 1
            else:
                out.server_detect.append(server[0])
                out.server_gave_up.append(max(0.0, server[1]))
            found = client_detection(client, hold)
            if found is None:
                out.client_missed += 1
            else:
                out.client_detect.append(found)
    return out
