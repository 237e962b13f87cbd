"""The chaos verifier: what the engine published (with its PubAck), what each device got.

It judges a scenario after its faults healed and its devices drained:

* **lost**: an alert that matches a device (``tests/reference.py``), PubAck'ed after the
  device was first created, and never received by it;
* **duplicates**: raw (every extra frame of an alert a device already had) and after the
  client's dedupe by ``alert_id`` (must be 0: the client hands each alert on once);
* **order violations**: per device, first receipts out of publish order (increasing
  ``ALERTS`` seq), or a frame whose ``seq`` disagrees with the alert's stream sequence;
* **misdeliveries**: received but not matching the device's token and subscription, or
  never published;
* **delay**: first receipt minus PubAck, worst overall and for alerts published during each
  fault window (by fault kind; the window reaches ``RECOVERY_SECONDS`` past the heal), and
  per named **phase** (exact windows a scenario marks, e.g. one node down / two down / after
  the heal), where the end-to-end delay (first publish attempt to first receipt) is kept too;
* **publish outage**: the longest time the engine went without a PubAck while it published.

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from ..reference import TooClose, reference

#: An alert counts as published "during" a fault from the fault's start until this long
#: after it healed: a restarted server or process takes a while to deliver again.
RECOVERY_SECONDS = 10.0


@dataclass(frozen=True)
class DeviceSpec:
    """A device: token (regions, None = admin), ack mode, groups and filters."""

    user: str
    client_id: str
    regions: tuple[str, ...] | None  # None: an admin token (every region)
    ack_mode: str = "client"
    groups: tuple[str, ...] = ()
    alert_types: tuple[str, ...] | None = None
    risk_threshold: float | None = None
    location: dict[str, Any] | None = None
    #: steady | churn | never_ack | slow (how the device's client behaves)
    behaviour: str = "steady"

    @property
    def key(self) -> str:
        return f"{self.user}/{self.client_id}"

    def subscription(self) -> dict[str, Any]:
        return {
            "groups": list(self.groups),
            "types": None if self.alert_types is None else list(self.alert_types),
            "risk_threshold": self.risk_threshold,
            "location": self.location,
        }

    def query(self) -> dict[str, str]:
        """The filter parameters of the connect's query (they replace stored filters)."""
        params: dict[str, str] = {}
        if self.alert_types is not None:
            params["alert_types"] = ",".join(self.alert_types)
        if self.risk_threshold is not None:
            params["risk_threshold"] = str(self.risk_threshold)
        if self.location is not None:
            params["location_filter"] = json.dumps(self.location)
        return params

    def matches(self, a: dict[str, Any]) -> bool | None:
        """The reference's verdict; None when a point lies within rounding of a radius."""
        token = None if self.regions is None else list(self.regions)
        try:
            return reference(a, self.subscription(), token)
        except TooClose:
            return None


def ref_alert(body: dict[str, Any]) -> dict[str, Any]:
    """An alert body (CONTRACT §4) as the reference predicate's plain dict."""
    loc = body["location"]
    point = (loc["lat"], loc["lon"]) if "lat" in loc else None
    return {
        "region": loc["region"],
        "level": body["alert_level"],
        "priority": body.get("priority", "normal"),
        "type": body["alert_type"],
        "point": point,
        "risk": body.get("risk_score"),
    }


@dataclass
class Published:
    alert_id: int | str
    ref: dict[str, Any]
    acked_at: float
    attempted_at: float  # the first publish attempt (retries keep the same alert_id)


@dataclass
class Receipt:
    seq: int
    alert_id: int | str
    redelivered: bool
    at: float


@dataclass
class Fault:
    kind: str
    start: float
    end: float | None = None


@dataclass
class Verifier:
    scenario: str = "scenario"
    published: dict[int | str, Published] = field(default_factory=dict)
    publish_order: list[int | str] = field(default_factory=list)
    devices: dict[str, DeviceSpec] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    receipts: dict[str, list[Receipt]] = field(default_factory=lambda: defaultdict(list))
    #: What each device's client handed on after its dedupe by alert_id, in order.
    accepted: dict[str, list[int | str]] = field(default_factory=lambda: defaultdict(list))
    faults: list[Fault] = field(default_factory=list)
    #: Named, non-overlapping windows of a scenario (``phase()``), by PubAck time.
    phases: list[Fault] = field(default_factory=list)
    truncated: Counter[str] = field(default_factory=Counter)
    connects: Counter[str] = field(default_factory=Counter)

    # ------------------------------------------------------------------ recording
    def device_created(self, spec: DeviceSpec, at: float) -> None:
        self.devices[spec.key] = spec
        self.created.setdefault(spec.key, at)

    def record_publish(
        self, body: dict[str, Any], acked_at: float, attempted_at: float | None = None
    ) -> None:
        """Only PubAck'ed alerts count; a retry of the same alert_id keeps the first ack."""
        if body["alert_id"] in self.published:
            return
        first = acked_at if attempted_at is None else attempted_at
        self.published[body["alert_id"]] = Published(
            body["alert_id"], ref_alert(body), acked_at, first
        )
        self.publish_order.append(body["alert_id"])

    def record_frame(self, device: str, frame: dict[str, Any], at: float) -> bool:
        """An ``alert`` frame; True when it is new to the device (the client's dedupe)."""
        alert_id = frame["alert"]["alert_id"]
        self.receipts[device].append(
            Receipt(frame["seq"], alert_id, bool(frame.get("redelivered")), at)
        )
        seen = self._seen.setdefault(device, set())
        if alert_id in seen:
            return False
        seen.add(alert_id)
        self.accepted[device].append(alert_id)
        return True

    def record_truncated(self, device: str, dropped: int) -> None:
        self.truncated[device] += dropped

    def fault_start(self, kind: str, at: float) -> Fault:
        fault = Fault(kind, at)
        self.faults.append(fault)
        return fault

    @staticmethod
    def fault_end(fault: Fault, at: float) -> None:
        fault.end = at

    def phase(self, name: str, at: float) -> None:
        """End the open phase (if any) at ``at`` and open ``name`` there."""
        self.end_phase(at)
        self.phases.append(Fault(name, at))

    def end_phase(self, at: float) -> None:
        if self.phases and self.phases[-1].end is None:
            self.phases[-1].end = at

    def __post_init__(self) -> None:
        self._seen: dict[str, set[int | str]] = {}

    # ------------------------------------------------------------------ judging
    def expected(self, device: str) -> set[int | str]:
        spec, created = self.devices[device], self.created[device]
        return {
            p.alert_id
            for p in self.published.values()
            if p.acked_at >= created and spec.matches(p.ref) is True
        }

    def missing(self, device: str) -> set[int | str]:
        return self.expected(device) - self._seen.get(device, set())

    def all_received(self) -> bool:
        return all(not self.missing(d) for d in self.devices)

    def report(self, stream_seqs: dict[int | str, int] | None = None) -> Report:
        """``stream_seqs``: alert_id -> ALERTS sequence, read from the stream at the end."""
        r = Report(self.scenario, published=len(self.published))
        r.faults = dict(Counter(f.kind for f in self.faults))
        first: dict[tuple[str, int | str], Receipt] = {}
        seq_of: dict[int | str, int] = dict(stream_seqs or {})
        for device, receipts in self.receipts.items():
            spec = self.devices.get(device)
            counts: Counter[int | str] = Counter()
            last_seq = 0
            for rec in receipts:
                counts[rec.alert_id] += 1
                if counts[rec.alert_id] > 1:
                    continue
                first[(device, rec.alert_id)] = rec
                if rec.seq <= last_seq:
                    r.order_violations += 1
                    r.examples.append(f"order: {device} got seq {rec.seq} after {last_seq}")
                last_seq = max(last_seq, rec.seq)
                known = seq_of.setdefault(rec.alert_id, rec.seq)
                if known != rec.seq:
                    r.order_violations += 1
                    r.examples.append(f"seq: {device} got {rec.alert_id} as {rec.seq}, not {known}")
                pub = self.published.get(rec.alert_id)
                if pub is None or spec is None or spec.matches(pub.ref) is False:
                    r.misdeliveries += 1
                    r.examples.append(f"misdelivery: {device} got {rec.alert_id}")
            r.frames += len(receipts)
            r.dupes_raw += sum(n - 1 for n in counts.values())
            r.redelivered += sum(rec.redelivered for rec in receipts)
            accepted = self.accepted.get(device, [])
            r.dupes_after_dedupe += len(accepted) - len(set(accepted))
        if stream_seqs is not None:
            r.not_in_stream = sum(1 for a in self.published if a not in stream_seqs)
        for device in self.devices:
            missing = self.missing(device)
            r.expected += len(self.expected(device))
            r.lost += len(missing)
            if missing:
                r.examples.append(f"lost: {device} never got {sorted(missing, key=str)[:5]}")
        r.truncated = sum(self.truncated.values())
        r.devices = len(self.devices)
        r.connects = sum(self.connects.values())
        delays: list[tuple[float, float]] = []  # (acked_at, delay)
        e2e: list[tuple[float, float]] = []  # (acked_at, first receipt - first attempt)
        for (_, alert_id), rec in first.items():
            pub = self.published.get(alert_id)
            if pub is not None:
                delays.append((pub.acked_at, rec.at - pub.acked_at))
                e2e.append((pub.acked_at, rec.at - pub.attempted_at))
        r.worst_delay = max((d for _, d in delays), default=0.0)
        for fault in self.faults:
            end = (fault.end if fault.end is not None else math.inf) + RECOVERY_SECONDS
            during = [d for t, d in delays if fault.start <= t <= end]
            worst = max(during, default=0.0)
            r.worst_delay_by_fault[fault.kind] = max(
                r.worst_delay_by_fault.get(fault.kind, 0), worst
            )
        for phase in self.phases:
            end = phase.end if phase.end is not None else math.inf
            r.phases.setdefault(phase.kind, [0, 0.0, 0.0])
            row = r.phases[phase.kind]
            row[0] += sum(1 for p in self.published.values() if phase.start <= p.acked_at < end)
            row[1] = max([row[1], *(d for t, d in delays if phase.start <= t < end)])
            row[2] = max([row[2], *(d for t, d in e2e if phase.start <= t < end)])
        acks = sorted(p.acked_at for p in self.published.values())
        r.publish_outage = max((b - a for a, b in pairwise(acks)), default=0.0)
        del r.examples[20:]
        return r

    def worst_delay_of(self, devices: set[str]) -> float:
        """Worst first-receipt delay over the given devices (e.g. bystanders of a slow one)."""
        worst = 0.0
        for device in devices:
            seen: set[int | str] = set()
            for rec in self.receipts.get(device, []):
                if rec.alert_id in seen or rec.alert_id not in self.published:
                    continue
                seen.add(rec.alert_id)
                worst = max(worst, rec.at - self.published[rec.alert_id].acked_at)
        return worst


@dataclass
class Report:
    scenario: str
    published: int = 0
    devices: int = 0
    connects: int = 0
    expected: int = 0
    frames: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    dupes_raw: int = 0
    dupes_after_dedupe: int = 0
    redelivered: int = 0
    order_violations: int = 0
    misdeliveries: int = 0
    not_in_stream: int = 0
    truncated: int = 0
    worst_delay: float = 0.0
    worst_delay_by_fault: dict[str, float] = field(default_factory=dict)
    #: phase -> [alerts PubAck'ed in it, worst delay from PubAck, worst from first attempt]
    phases: dict[str, list[float]] = field(default_factory=dict)
    #: The longest gap between consecutive PubAcks (time the engine could not publish).
    publish_outage: float = 0.0
    publish_retries: int = 0
    #: Device queues the gateways rebuilt from their records (their node was down).
    queues_rebuilt: int | None = None
    bystander_worst_delay: float | None = None
    mode: str = "short"
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["worst_delay"] = round(self.worst_delay, 3)
        out["worst_delay_by_fault"] = {k: round(v, 3) for k, v in self.worst_delay_by_fault.items()}
        out["phases"] = {k: [round(x, 3) for x in v] for k, v in self.phases.items()}
        out["publish_outage"] = round(self.publish_outage, 3)
        if self.bystander_worst_delay is not None:
            out["bystander_worst_delay"] = round(self.bystander_worst_delay, 3)
        return out

    def table(self) -> str:
        rows = [
            ("scenario", f"{self.scenario} ({self.mode}, {self.seconds:.0f} s of load)"),
            ("alerts published (PubAck)", self.published),
            ("devices / connects", f"{self.devices} / {self.connects}"),
            ("faults", ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())) or "-"),
            ("expected receipts", self.expected),
            ("alert frames", f"{self.frames} ({self.redelivered} flagged redelivered)"),
            ("lost", self.lost),
            ("duplicates raw / after dedupe", f"{self.dupes_raw} / {self.dupes_after_dedupe}"),
            ("order violations", self.order_violations),
            ("misdeliveries", self.misdeliveries),
            ("published, not in ALERTS", self.not_in_stream),
            ("backlog truncated (dropped)", self.truncated),
            ("worst delay overall", f"{self.worst_delay:.3f} s"),
        ]
        rows += [
            (f"worst delay, {k} (+{RECOVERY_SECONDS:.0f} s)", f"{v:.3f} s")
            for k, v in sorted(self.worst_delay_by_fault.items())
        ]
        if self.bystander_worst_delay is not None:
            rows.append(("worst delay, bystanders", f"{self.bystander_worst_delay:.3f} s"))
        for name, (count, worst, e2e) in self.phases.items():
            rows.append(
                (
                    f"phase {name}",
                    f"{count:.0f} acked, worst {worst:.3f} s (from 1st try {e2e:.3f} s)",
                )
            )
        if self.phases:
            rows.append(
                (
                    "publish outage (no PubAck)",
                    f"{self.publish_outage:.3f} s, {self.publish_retries} retries",
                )
            )
        if self.queues_rebuilt is not None:
            rows.append(("queues rebuilt (gateway logs)", self.queues_rebuilt))
        width = max(len(k) for k, _ in rows)
        lines = [f"  {k:<{width}}  {v}" for k, v in rows]
        lines += [f"  ! {e}" for e in self.examples]
        return "\n".join(lines)

    def append_jsonl(self, path: str | Path) -> None:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(self.as_dict(), sort_keys=True) + "\n")

    def failures(self) -> list[str]:
        problems = []
        for name in ("lost", "misdeliveries", "order_violations", "dupes_after_dedupe"):
            if getattr(self, name):
                problems.append(f"{name} = {getattr(self, name)}")
        if self.truncated:
            problems.append(f"backlog truncated {self.truncated} (offline_queue_max too low)")
        return problems
