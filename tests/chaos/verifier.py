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

Connections (the harness registers every socket with :meth:`Verifier.open_connection` and
tags each frame with it; a device's receipts are the union over its connections). Each
connection carries the token it used, so a device may change tokens between connections
(``DeviceSpec.tokens``) and several connections of one device may overlap in time:

* **misdeliveries** are judged per connection, against the token *that connection used*
  (and the device's subscription): every alert received on a connection for the first time
  there, redeliveries of an earlier connection's sends included. A ``KE`` connection that
  is handed ``UG-102`` is a misdelivery even though the device's other token allows it.
* **lost** counts only alerts that *every* token the device used during the run selects
  (with its subscription): an alert outside one token's regions, published while the
  device used that token, may be passed over by design and never arrive. The union of the
  device's connections must hold every such alert.
* **unflagged repeats**: a frame of an alert the device already received (on any of its
  connections) that says ``redelivered: false``. The contract allows them after a gateway
  ``kill -9`` only (alerts acked within the last checkpoint interval come again, possibly
  unflagged: docs/architecture.md §11; likewise after a NATS node kill), so a repeat is
  *excused* when a kill (``EXCUSING``) began between the device's previous receipt of the
  alert and this one: each kill excuses one repeat of each alert a device had before it,
  however long after the kill it comes (the device's next connection reads the stale
  position whenever it is established: on a loaded machine that can be long after the
  heal), and a second unflagged repeat with no kill between is a fault. "Had before" is
  judged by the connection of the previous receipt (a stalled reader reads what the dead
  gateway wrote long after the kill). Both numbers are reported;
  only the unexcused ones fail a scenario.
* **connection order**: per connection, the alerts it receives for the first time (on that
  connection) come in increasing ``ALERTS`` sequence. Sound because one session sends its
  backlog in stream order and then live alerts in stream order, and a resend repeats a seq
  this connection already had; TCP keeps a connection's frames in order.
* **connection gaps** and **settled unseen** (acks that settled what the acking connection
  never received). For a connection C with token T, let *owed(C)* be the alerts T and the
  device's subscription select (the reference's verdict, not TooClose), PubAck'ed after
  the device was created. C's receipts span the ALERTS sequences [lo, hi]. A correct
  session resumes the device's queue at its floor + 1 and sends every owed alert after
  that, in order, before and after going live; so every owed alert with lo < seq < hi must
  have reached C. One that did not is a gap: someone else read it from the device's queue
  (two sessions splitting one durable), or it was skipped. A gap at or below the highest
  seq C acked is also *settled unseen*: C's cumulative ack settled an alert C never had.
  This stays sound across token changes (the queue's filter follows C's token from C's
  open on), across gateway kills and NATS restarts (a new connection restarts at the saved
  floor; a dead one sends nothing more), and for slow or never-acking readers (nothing is
  skipped, only delayed). Gaps before lo (the floor) and after hi (not yet sent) are not
  judged: per connection they are legitimate; the device-level loss check covers them.
* The **device-level order** check (first receipts of the device in increasing seq) is
  kept for devices whose connections never overlapped in time and all used one token; for
  the others it is unsound (an alert a narrower token passed over may legitimately come
  later on a wider one; frames of two open sockets race in the client), and the
  per-connection checks above stand in for it.
* **overlaps**: each time the harness opens connections of one device while another of its
  connections is open (or several at the same instant), it records an :class:`Overlap`.
  After its settle time exactly one of them may still be open (``several open``), the
  others closed by the server with 4009 (another close code before the settle time is a
  violation); if every one was closed with 4009 nobody owns the device (also a
  violation). Where the protocol names the winner (a later connect replaces an older
  connection) a different survivor is a violation too.
* **slow takeovers**: a connection marked ``prompt`` (it replaces an open connection of
  the device, even a stalled reader, or one that just ended; not one of several opened at
  the same instant) must see ``connection_established`` within ``TAKEOVER_SECONDS`` of
  starting its handshake, unless the server closed it with 4009.
* **late probes**: while readers are stalled (a :class:`Stall`), probe alerts are
  published for the other devices; each bystander must get every probe meant for it
  before the stall ends (the harness holds the stall until they arrive, with a deadline):
  one it got later, or never, was held up by the stalled reader. An order, not a delay.

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

#: Faults after which a repeat may come unflagged (see Verifier._excused). A NATS restart
#: is one: a device that reconnects to a gateway that is back on NATS before the one holding
#: its session is claimed there (no responder), and what the old session had not saved yet
#: (acks since its last checkpoint, the highest seq sent) is lost with it, as after a kill
#: (docs/architecture.md §11).
EXCUSING = frozenset({"gateway_kill", "node_kill", "nats_restart"})
#: An alert counts as published "during" a fault from the fault's start until this long
#: after it healed: a restarted server or process takes a while to deliver again.
RECOVERY_SECONDS = 10.0
#: A connection that replaces an open one (even a stalled reader) must be established
#: within this many seconds of starting its handshake. The old one's final save is a few
#: NATS requests; waiting out a takeover timeout (TOCSIN_SHUTDOWN_GRACE_SECONDS) is not.
TAKEOVER_SECONDS = 2.0
#: Examples of each kind of finding a report keeps.
EXAMPLES = 4
#: Close code of a connection replaced by a newer one of the same device.
REPLACED = 4009

Token = tuple[str, ...] | None  # a token's regions; None: an admin token (every region)


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
    #: steady | churn | never_ack | slow | stalling | concurrent | token_change | stalled
    #: (how the device's client behaves)
    behaviour: str = "steady"
    #: The tokens (regions) the device's connections take in turn (token_change); empty:
    #: always ``regions``.
    tokens: tuple[Token, ...] = ()

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
        return self.matches_with(a, self.regions)

    def matches_with(self, a: dict[str, Any], regions: Token) -> bool | None:
        """The verdict for this device's subscription under a token with ``regions``."""
        token = None if regions is None else list(regions)
        try:
            return reference(a, self.subscription(), token)
        except TooClose:
            return None

    def token_cycle(self) -> tuple[Token, ...]:
        return self.tokens or (self.regions,)


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
    conn: int = 0  # the connection (Verifier.connections); 0: not registered


@dataclass
class Connection:
    """One socket of one device, as its client saw it."""

    id: int
    device: str
    regions: Token  # the token this connection used
    acks: bool  # whether its client acks (ack_mode=client and not a never-acking one)
    opened: float  # the client started its handshake
    role: str = ""
    established: float | None = None  # connection_established arrived
    closed: float | None = None  # the client saw it end, or abandoned it
    close_code: int | None = None
    acked: int = 0  # the highest seq its client acked
    #: its handshake must be prompt: it replaces an open connection of the device, or one
    #: that just ended (not one of several opened at the same instant)
    prompt: bool = False

    @property
    def handshake(self) -> float | None:
        return None if self.established is None else self.established - self.opened


@dataclass
class Overlap:
    """Connections of one device open at the same time, on purpose (a fault)."""

    kind: str  # concurrent_connect | token_overlap | token_concurrent | stalled_takeover ...
    device: str
    conns: list[int]  # the connections opened for it (and the one they overlap, if any)
    at: float
    #: connections still open when the client stopped waiting for the server to settle it
    survivors: list[int] = field(default_factory=list)
    #: the one the protocol says must survive (a later connect replaces an older one)
    winner: int | None = None
    #: when the client stopped waiting (survivors are as of then); None: at ``at``
    settled: float | None = None


@dataclass
class Fault:
    kind: str
    start: float
    end: float | None = None


@dataclass
class Stall:
    """Readers that stopped reading their sockets for a while, and the probe alerts
    published meanwhile: each bystander must get every probe meant for it while the readers
    are still stalled (``end``), or the stall held it up."""

    devices: list[str]
    start: float
    end: float | None = None
    #: bystander -> the probes it must receive (published after the stall began)
    probes: dict[str, set[int | str]] = field(default_factory=dict)


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
    connections: dict[int, Connection] = field(default_factory=dict)
    overlaps: list[Overlap] = field(default_factory=list)
    stalls: list[Stall] = field(default_factory=list)

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

    def open_connection(
        self,
        device: str,
        regions: Token,
        at: float,
        acks: bool = True,
        role: str = "",
        prompt: bool = False,
    ) -> Connection:
        conn = Connection(len(self.connections) + 1, device, regions, acks, at, role)
        conn.prompt = prompt
        self.connections[conn.id] = conn
        return conn

    @staticmethod
    def connection_established(conn: Connection, at: float) -> None:
        if conn.established is None:
            conn.established = at

    @staticmethod
    def connection_closed(conn: Connection, at: float, code: int | None) -> None:
        if conn.closed is None:
            conn.closed, conn.close_code = at, code

    @staticmethod
    def record_ack(conn: Connection, seq: int) -> None:
        conn.acked = max(conn.acked, seq)

    def record_overlap(self, overlap: Overlap) -> Overlap:
        self.overlaps.append(overlap)
        return overlap

    def record_frame(
        self, device: str, frame: dict[str, Any], at: float, conn: Connection | None = None
    ) -> bool:
        """An ``alert`` frame; True when it is new to the device (the client's dedupe)."""
        alert_id = frame["alert"]["alert_id"]
        self.receipts[device].append(
            Receipt(
                frame["seq"],
                alert_id,
                bool(frame.get("redelivered")),
                at,
                0 if conn is None else conn.id,
            )
        )
        seen = self._seen.setdefault(device, set())
        if alert_id in seen:
            return False
        seen.add(alert_id)
        self.accepted[device].append(alert_id)
        return True

    def has(self, device: str, alert_id: int | str) -> bool:
        """The device's client got this alert (on any connection)."""
        return alert_id in self._seen.get(device, ())

    def probes_delivered(self, stall: Stall) -> bool:
        return all(self.has(d, a) for d, ids in stall.probes.items() for a in ids)

    def late_probes(self, stall: Stall) -> list[str]:
        """The probes a bystander got only after the stall ended, or never."""
        late = []
        end = stall.end if stall.end is not None else math.inf
        for device, ids in sorted(stall.probes.items()):
            firsts: dict[int | str, float] = {}
            for rec in self.receipts.get(device, []):
                firsts.setdefault(rec.alert_id, rec.at)
            for alert_id in sorted(ids, key=str):
                at = firsts.get(alert_id)
                if at is None or at >= end:
                    got = "never" if at is None else f"{at - end:+.3f} s after the stall"
                    late.append(f"{device} got probe {alert_id} {got}")
        return late

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
    def tokens_used(self, device: str) -> set[Token]:
        """Every token the device used: its spec's and each registered connection's."""
        used: set[Token] = {self.devices[device].regions}
        used.update(c.regions for c in self.connections.values() if c.device == device)
        return used

    def expected(self, device: str) -> set[int | str]:
        """What the device must get: selected by every token it used (and its subscription),
        PubAck'ed after it was created."""
        spec, created = self.devices[device], self.created[device]
        tokens = self.tokens_used(device)
        return {
            p.alert_id
            for p in self.published.values()
            if p.acked_at >= created and all(spec.matches_with(p.ref, t) is True for t in tokens)
        }

    def device_order_applies(self, device: str) -> bool:
        """The device-level order check is sound for one token and no overlapping sockets."""
        if len(self.tokens_used(device)) > 1:
            return False
        conns = sorted(
            (c for c in self.connections.values() if c.device == device), key=lambda c: c.opened
        )
        return all(a.closed is not None and a.closed <= b.opened for a, b in pairwise(conns))

    def _excused(self, previous: Receipt, at: float) -> bool:
        """An unflagged repeat the contract allows, of an alert the device may have been
        sent before a fault that began since its previous receipt: a gateway kill (the last
        checkpoint and record are behind), or a NATS node kill (a queue rebuilt from a
        record whose last write, the release, did not reach DEVICES while it re-elected:
        docs/architecture.md, failure modes). "Sent before" is judged by the connection of
        the previous receipt: a client that stopped reading takes in what the dead gateway
        wrote after the kill."""
        conn = self.connections.get(previous.conn)
        sent_by = min(previous.at, conn.opened) if conn is not None else previous.at
        return any(f.kind in EXCUSING and sent_by < f.start <= at for f in self.faults)

    def missing(self, device: str) -> set[int | str]:
        return self.expected(device) - self._seen.get(device, set())

    def all_received(self) -> bool:
        return all(not self.missing(d) for d in self.devices)

    def report(self, stream_seqs: dict[int | str, int] | None = None) -> Report:
        """``stream_seqs``: alert_id -> ALERTS sequence, read from the stream at the end."""
        r = Report(self.scenario, published=len(self.published))
        r.faults = dict(Counter(f.kind for f in self.faults))
        first: dict[tuple[str, int | str], Receipt] = {}
        latest: dict[tuple[str, int | str], Receipt] = {}
        seq_of: dict[int | str, int] = dict(stream_seqs or {})
        for device, receipts in self.receipts.items():
            spec = self.devices.get(device)
            device_order = spec is None or self.device_order_applies(device)
            counts: Counter[int | str] = Counter()
            last_seq = 0
            on_connection: set[tuple[int, int | str]] = set()
            for rec in receipts:
                counts[rec.alert_id] += 1
                if rec.conn and (rec.conn, rec.alert_id) in on_connection:
                    r.repeats_on_connection += 1
                    r.note(
                        f"sent twice on one connection: {device} got {rec.alert_id} "
                        f"again on {rec.conn}"
                    )
                on_connection.add((rec.conn, rec.alert_id))
                earlier = latest.get((device, rec.alert_id))
                latest[(device, rec.alert_id)] = rec
                if earlier is not None:
                    if not rec.redelivered:
                        if self._excused(earlier, rec.at):
                            r.unflagged_repeats_after_kill += 1
                        else:
                            r.unflagged_repeats += 1
                            r.note(
                                f"unflagged repeat: {device} got {rec.alert_id} (seq {rec.seq}) "
                                f"again on connection {rec.conn} (before on {earlier.conn})"
                            )
                    continue
                first[(device, rec.alert_id)] = rec
                if device_order and rec.seq <= last_seq:
                    r.order_violations += 1
                    r.note(f"order: {device} got seq {rec.seq} after {last_seq}")
                last_seq = max(last_seq, rec.seq)
                known = seq_of.setdefault(rec.alert_id, rec.seq)
                if known != rec.seq:
                    r.order_violations += 1
                    r.note(f"seq: {device} got {rec.alert_id} as {rec.seq}, not {known}")
                pub = self.published.get(rec.alert_id)
                # registered connections are judged against their own token below
                unjudged = rec.conn not in self.connections
                if pub is None or spec is None or (unjudged and spec.matches(pub.ref) is False):
                    r.misdeliveries += 1
                    r.note(f"misdelivery: {device} got {rec.alert_id}")
            r.frames += len(receipts)
            r.dupes_raw += sum(n - 1 for n in counts.values())
            r.redelivered += sum(rec.redelivered for rec in receipts)
            accepted = self.accepted.get(device, [])
            r.dupes_after_dedupe += len(accepted) - len(set(accepted))
        self._judge_connections(r, seq_of)
        self._judge_overlaps(r)
        for stall in self.stalls:
            r.stall_probes += sum(len(ids) for ids in stall.probes.values())
            late = self.late_probes(stall)
            r.late_probes += len(late)
            for example in late:
                r.note(f"late probe: {example} ({', '.join(stall.devices)} stalled)")
        if stream_seqs is not None:
            r.not_in_stream = sum(1 for a in self.published if a not in stream_seqs)
        for device in self.devices:
            missing = self.missing(device)
            r.expected += len(self.expected(device))
            r.lost += len(missing)
            if missing:
                r.note(f"lost: {device} never got {sorted(missing, key=str)[:5]}")
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
        return r

    def _judge_connections(self, r: Report, seq_of: dict[int | str, int]) -> None:
        """Per connection: misdelivery against its own token, order, gaps, settled unseen."""
        by_conn: dict[int, list[Receipt]] = defaultdict(list)
        for receipts in self.receipts.values():
            for rec in receipts:
                if rec.conn in self.connections:
                    by_conn[rec.conn].append(rec)
        r.connections = len(self.connections)
        owed_cache: dict[tuple[str, Token], list[tuple[int, int | str]]] = {}
        for cid, receipts in by_conn.items():
            conn = self.connections[cid]
            spec = self.devices.get(conn.device)
            if spec is None:
                continue
            got: set[int | str] = set()
            last = 0
            for rec in receipts:
                if rec.alert_id in got:
                    continue  # a resend on this connection
                got.add(rec.alert_id)
                if rec.seq <= last:
                    r.connection_order += 1
                    r.note(f"connection order: {conn.device} #{cid} got seq {rec.seq} after {last}")
                last = max(last, rec.seq)
                pub = self.published.get(rec.alert_id)
                if pub is not None and spec.matches_with(pub.ref, conn.regions) is False:
                    r.misdeliveries += 1
                    r.note(
                        f"misdelivery: {conn.device} #{cid} (token {conn.regions}) got "
                        f"{rec.alert_id} ({pub.ref['region']})"
                    )
            key = (conn.device, conn.regions)
            if key not in owed_cache:
                created = self.created.get(conn.device, math.inf)
                owed_cache[key] = sorted(
                    (seq_of[p.alert_id], p.alert_id)
                    for p in self.published.values()
                    if p.alert_id in seq_of
                    and p.acked_at >= created
                    and spec.matches_with(p.ref, conn.regions) is True
                )
            seqs = [rec.seq for rec in receipts]
            lo, hi = min(seqs), max(seqs)
            gaps = [(seq, a) for seq, a in owed_cache[key] if lo < seq < hi and a not in got]
            settled = [(seq, a) for seq, a in gaps if seq <= conn.acked]
            r.connection_gaps += len(gaps)
            r.settled_unseen += len(settled)
            if gaps:
                r.note(
                    f"gap: {conn.device} #{cid} got seqs {lo}..{hi} without "
                    f"{[seq for seq, _ in gaps[:5]]} ({len(gaps)}), acked to {conn.acked}: "
                    f"{len(settled)} settled unseen"
                )

    def _judge_overlaps(self, r: Report) -> None:
        for o in self.overlaps:
            r.overlaps[o.kind] = r.overlaps.get(o.kind, 0) + 1
            conns = [self.connections[c] for c in o.conns if c in self.connections]
            replaced = [c for c in conns if c.close_code == REPLACED]
            bad = ""
            if len(o.survivors) > 1:
                bad = f"{len(o.survivors)} connections stayed open"
            elif o.winner is not None and o.survivors != [o.winner]:
                bad = f"the newer #{o.winner} did not survive (open: {o.survivors})"
            elif not o.survivors and conns and len(replaced) == len(conns):
                bad = "every connection was closed with 4009: nobody owns the device"
            else:
                settled = o.settled if o.settled is not None else o.at
                wrong = [
                    c
                    for c in conns
                    if c.closed is not None
                    and c.closed <= settled
                    and c.close_code not in (None, REPLACED)  # None: the client abandoned it
                ]
                if wrong:
                    bad = f"#{wrong[0].id} was closed with {wrong[0].close_code}, not 4009"
            if bad:
                r.overlap_violations += 1
                ends = ", ".join(f"#{c.id}: {self._story(c, o.at)}" for c in conns)
                r.note(f"overlap {o.kind}: {o.device} {bad} ({ends})")
        r.replaced = sum(1 for c in self.connections.values() if c.close_code == REPLACED)
        for c in self.connections.values():
            if not c.prompt:
                continue
            took = c.handshake
            if took is None and (c.close_code == REPLACED or c.closed is None):
                continue  # lost a race (4009), or still waiting at the end of the run
            if took is not None:
                r.worst_takeover = max(r.worst_takeover, took)
            if took is None or took > TAKEOVER_SECONDS:
                r.slow_takeovers += 1
                r.note(
                    f"slow takeover: {c.device} #{c.id} ({c.role}) "
                    + (f"established after {took:.2f} s" if took is not None else "")
                    + (f"never established ({self._story(c, c.opened)})" if took is None else "")
                )

    @staticmethod
    def _story(c: Connection, since: float) -> str:
        """A connection's life relative to ``since``, for examples."""
        est = "never established" if c.established is None else f"up +{c.established - since:.2f}"
        if c.closed is None:
            return f"{est}, open"
        code = "no close frame" if c.close_code is None else f"closed {int(c.close_code)}"
        return f"{est}, {code} +{c.closed - since:.2f} s"

    def delays_of(self, devices: set[str] | None = None) -> list[float]:
        """First receipt minus PubAck of each published alert each device got (of every
        device with None)."""
        out: list[float] = []
        for device in self.receipts if devices is None else sorted(devices):
            seen: set[int | str] = set()
            for rec in self.receipts.get(device, []):
                if rec.alert_id in seen or rec.alert_id not in self.published:
                    continue
                seen.add(rec.alert_id)
                out.append(rec.at - self.published[rec.alert_id].acked_at)
        return out

    def worst_delay_of(self, devices: set[str]) -> float:
        """Worst first-receipt delay over the given devices (e.g. bystanders of a slow one)."""
        return max(self.delays_of(devices), default=0.0)


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
    #: repeats of an alert the device had, flagged redelivered: false (outside the exception)
    unflagged_repeats: int = 0
    #: the same, inside a gateway_kill window (allowed by the contract)
    unflagged_repeats_after_kill: int = 0
    #: an alert frame a connection had already received on that connection: a resend on
    #: a link that stayed open (CONTRACT §6: TCP delivers or breaks)
    repeats_on_connection: int = 0
    connections: int = 0
    connection_order: int = 0
    connection_gaps: int = 0
    settled_unseen: int = 0
    overlaps: dict[str, int] = field(default_factory=dict)
    overlap_violations: int = 0
    slow_takeovers: int = 0
    worst_takeover: float = 0.0
    replaced: int = 0  # connections closed with 4009
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
    #: Probe alerts for bystanders published while readers were stalled (Stall), and
    #: those a bystander got only after the stall ended (or never): held up by it.
    stall_probes: int = 0
    late_probes: int = 0
    mode: str = "short"
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def note(self, example: str) -> None:
        """Keep an example of a finding: at most EXAMPLES of each kind (the text before
        its first colon), so that one flood does not hide the others."""
        kind = example.split(":", 1)[0]
        self._noted[kind] = self._noted.get(kind, 0) + 1
        if self._noted[kind] <= EXAMPLES:
            self.examples.append(example)

    def __post_init__(self) -> None:
        self._noted: dict[str, int] = {}

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        out["examples_left_out"] = sum(max(0, n - EXAMPLES) for n in self._noted.values())
        out["worst_delay"] = round(self.worst_delay, 3)
        out["worst_delay_by_fault"] = {k: round(v, 3) for k, v in self.worst_delay_by_fault.items()}
        out["phases"] = {k: [round(x, 3) for x in v] for k, v in self.phases.items()}
        out["publish_outage"] = round(self.publish_outage, 3)
        out["worst_takeover"] = round(self.worst_takeover, 3)
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
            (
                "unflagged repeats (after a gateway kill)",
                f"{self.unflagged_repeats} ({self.unflagged_repeats_after_kill})",
            ),
            ("repeats on one connection", self.repeats_on_connection),
            (
                "connections: order / gaps / settled unseen",
                f"{self.connections}: {self.connection_order} / {self.connection_gaps} / "
                f"{self.settled_unseen}",
            ),
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
        if self.stall_probes:
            rows.append(
                (
                    "probes to bystanders while stalled (late)",
                    f"{self.stall_probes} ({self.late_probes})",
                )
            )
        if self.overlaps:
            rows.append(
                (
                    "overlaps (violations)",
                    ", ".join(f"{k} {v}" for k, v in sorted(self.overlaps.items()))
                    + f" ({self.overlap_violations}); closed 4009: {self.replaced}",
                )
            )
            rows.append(
                (
                    "worst takeover (slow)",
                    f"{self.worst_takeover:.3f} s ({self.slow_takeovers} over "
                    f"{TAKEOVER_SECONDS:.0f} s)",
                )
            )
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
        left = sum(max(0, n - EXAMPLES) for n in self._noted.values())
        if left:
            lines.append(f"  ! ... and {left} more")
        return "\n".join(lines)

    def append_jsonl(self, path: str | Path) -> None:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(self.as_dict(), sort_keys=True) + "\n")

    def failures(self) -> list[str]:
        problems = []
        names = (
            "lost",
            "misdeliveries",
            "order_violations",
            "dupes_after_dedupe",
            "unflagged_repeats",
            "repeats_on_connection",
            "connection_order",
            "connection_gaps",
            "settled_unseen",
            "overlap_violations",
            "slow_takeovers",
            "late_probes",
        )
        for name in names:
            if getattr(self, name):
                problems.append(f"{name} = {getattr(self, name)}")
        if self.truncated:
            problems.append(f"backlog truncated {self.truncated} (offline_queue_max too low)")
        return problems
