"""The gateway's open sessions, and what the closed ones did: the counters ``/metrics``
and the stats read (they never write them).

The handler adds a session once it is served and discards it when it ends; on the way out
its counters are added to :class:`Totals`, so a counter never goes down.
"""

from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tocsin.schemas import Close

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

#: ``reason`` of a close the server did not choose (the client closed or went away).
CLIENT_CLOSED = "client"
#: Every reason is known from the start (counted from 0), so that rate() sees the first.
REASONS = (CLIENT_CLOSED, *(code.name.lower() for code in Close))


def close_reason(code: int | None) -> str:
    if code is None:
        return CLIENT_CLOSED
    try:
        return str(Close(code).name).lower()
    except ValueError:
        return str(code)


#: Delivery latency buckets (seconds): a loopback delivery takes ~1 ms, a backlog read
#: tens, a 2G link's append → written is dominated by the gateway, not the link.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Handshake (request → connection_established queued) and catch-up (established → live).
HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0)
CATCHUP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)
#: avg_latency_ms of the stats: over this many most recent seconds.
RECENT_SECONDS = 60


class Histogram:
    """Counts per bucket and a sum, for the hot path: one bisect and two additions per
    observation, no lock (one event loop). ``/metrics`` exposes it as a Prometheus
    histogram (cumulative buckets, ``+Inf`` = count)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.sum += value * n

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count at or below)`` for every bound and ``+Inf``."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class RecentAverage:
    """The mean of what was observed in the last ``seconds`` whole seconds (one slot per
    second, reused as time passes): the stats' ``avg_latency_ms``."""

    def __init__(self, seconds: int = RECENT_SECONDS) -> None:
        self.seconds = seconds
        self._second = [-1] * seconds
        self._sum = [0.0] * seconds
        self._count = [0] * seconds

    def observe(self, value: float, now: float, n: int = 1) -> None:
        second = int(now)
        slot = second % self.seconds
        if self._second[slot] != second:
            self._second[slot], self._sum[slot], self._count[slot] = second, 0.0, 0
        self._sum[slot] += value * n
        self._count[slot] += n

    def mean(self, now: float) -> float | None:
        oldest = int(now) - self.seconds + 1
        total = count = 0.0
        for second, s, n in zip(self._second, self._sum, self._count, strict=True):
            if second >= oldest:
                total, count = total + s, count + n
        return total / count if count else None


@dataclass
class TaskStatus:
    """One background task of the gateway, as the stats show it."""

    running: bool = False
    last_run: float | None = None  # unix time its last pass ended
    last_error: str | None = None
    last_error_at: float | None = None

    def ran(self, error: BaseException | None = None) -> None:
        self.last_run = time.time()
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"[:500]
            self.last_error_at = self.last_run

    def as_dict(self) -> dict[str, object]:
        return {
            "running": self.running,
            "last_run": iso_time(self.last_run),
            "last_error": self.last_error,
            "last_error_at": iso_time(self.last_error_at),
        }


def iso_time(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


@dataclass
class Timings:
    """Latency of delivery by path, handshake and catch-up durations."""

    live: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    backlog: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    handshake: Histogram = field(default_factory=lambda: Histogram(HANDSHAKE_BUCKETS))
    catchup: Histogram = field(default_factory=lambda: Histogram(CATCHUP_BUCKETS))
    recent: RecentAverage = field(default_factory=RecentAverage)

    def delivered(self, live: bool, appended: float, now: float, n: int = 1) -> None:
        """``n`` frames of an alert were written ``now``; ``appended``: when ALERTS stored it."""
        latency = max(0.0, now - appended)
        (self.live if live else self.backlog).observe(latency, n)
        self.recent.observe(latency, now, n)


class Totals:
    """What closed sessions did, and how they ended."""

    def __init__(self) -> None:
        self.opened = 0
        self.sent = 0
        self.redelivered = 0
        self.acks = 0
        self.rate_limit_warnings = 0
        self.superseded = 0  # backlog alerts passed over: a later update or cancel replaced them
        self.closes: Counter[str] = Counter()

    def session_left(self, session: Session) -> None:
        self.sent += session.sent
        self.redelivered += session.redelivered
        self.acks += session.acks
        self.rate_limit_warnings += session.rate_limit_warnings
        code = session.closing[0] if session.closing else None
        self.closes[close_reason(code)] += 1


class Sessions(set["Session"]):
    """``Gateway.sessions``: the open sessions, counted in; their counters added up on the
    way out."""

    def __init__(self, sessions: Iterable[Session] = ()) -> None:
        super().__init__(sessions)
        self.totals = Totals()
        self.timings = Timings()
        #: The gateway's background tasks by name (context.py keeps them up to date).
        self.tasks: dict[str, TaskStatus] = {}
        #: When the ticker visits each session next, a heap of (time, n, session); an entry
        #: whose time is not its session's ``next_sweep`` (rescheduled) or whose session
        #: left is skipped.
        self._due: list[tuple[float, int, Session]] = []
        self._order = itertools.count()
        #: Sessions with frames corked in this pass of the event loop (Session._write_now).
        self._corked: list[Session] = []
        #: The alerts' frames corked in this pass, by when ALERTS stored each: timed when
        #: they are written, at the end of the pass, with one observation per alert.
        self._corked_live: dict[float, int] = {}
        self._corked_backlog: dict[float, int] = {}

    def cork(self, session: Session) -> None:
        """``session`` has corked frames: they are written at the end of this pass of the
        event loop, with every other session's, one write per session."""
        if not self._corked:
            asyncio.get_running_loop().call_soon(self._uncork)
        self._corked.append(session)

    def corked_alert(self, live: bool, appended: float) -> None:
        """A frame of the alert ``appended`` (when ALERTS stored it) was corked."""
        by = self._corked_live if live else self._corked_backlog
        by[appended] = by.get(appended, 0) + 1

    def _uncork(self) -> None:
        corked, self._corked = self._corked, []
        for session in corked:
            if session.corked:  # not written meanwhile (Session._enqueue)
                try:
                    session.uncork()
                except Exception:  # one broken socket must not keep the others corked
                    log.exception("session %s: corked frames not written", session.id)
        now = time.time()
        for live, by in ((True, self._corked_live), (False, self._corked_backlog)):
            for appended, n in by.items():
                self.timings.delivered(live, appended, now, n)
            by.clear()

    def schedule(self, session: Session, at: float) -> None:
        session.next_sweep = at
        heapq.heappush(self._due, (at, next(self._order), session))

    def due(self, now_mono: float) -> list[Session]:
        """The open sessions whose visit is due, each once; they are to be scheduled again."""
        heap, out = self._due, []
        while heap and heap[0][0] <= now_mono:
            at, _, session = heapq.heappop(heap)
            if at == session.next_sweep and session in self:
                session.next_sweep = float("inf")  # taken: a second entry of it is skipped
                out.append(session)
        if len(heap) > 2 * len(self) + 1024:  # mostly stale: closed or rescheduled sessions
            live = [(e[0], e[1], e[2]) for e in heap if e[0] == e[2].next_sweep and e[2] in self]
            heapq.heapify(live)
            self._due = live
        return out

    def task(self, name: str) -> TaskStatus:
        return self.tasks.setdefault(name, TaskStatus())

    # What every open session and every closed one did (counters never go down).
    @property
    def sent(self) -> int:
        return self.totals.sent + sum(s.sent for s in self)

    @property
    def redelivered(self) -> int:
        return self.totals.redelivered + sum(s.redelivered for s in self)

    @property
    def acks(self) -> int:
        return self.totals.acks + sum(s.acks for s in self)

    @property
    def rate_limit_warnings(self) -> int:
        return self.totals.rate_limit_warnings + sum(s.rate_limit_warnings for s in self)

    def healthy(self, now_mono: float) -> int:
        return sum(s.healthy(now_mono) for s in self)

    def add(self, session: Session) -> None:
        if session not in self:
            self.totals.opened += 1
            super().add(session)
            self.schedule(session, session.next_sweep)

    def discard(self, session: object) -> None:
        if session in self:
            super().discard(session)
            self.totals.session_left(session)  # type: ignore[arg-type]

    def remove(self, session: object) -> None:
        if session not in self:
            raise KeyError(session)
        self.discard(session)
