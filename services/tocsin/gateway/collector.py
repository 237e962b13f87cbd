"""Keep connection state out of Python's full garbage collections.

A gateway holds thousands of sessions whose objects live as long as their sockets. Python's
generational collector rescans all of them in every full (generation 2) collection, and
with growing heaps it runs those often: in ``tocsin bench --full`` (10,000 connections)
the gateway spent 29.8 s in 34 full collections, up to 2.75 s each, stopping delivery
every time (docs/benchmarks.md). ``gc.freeze()`` moves everything alive into a permanent
generation that collections skip, so they only look at what is new.

What it costs: cyclic garbage among frozen objects (a closed session's leftovers) is not
collected while frozen. So after enough sessions have closed since the last time, the
collector unfreezes, collects once (one pause, proportional to the heap) and freezes
again: the leak is bounded by the churn allowed, and the pause happens once per that much
churn instead of on the collector's own schedule. Below ``min_sessions`` open sessions full
collections are cheap, and nothing is frozen.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from .registry import Histogram

log = logging.getLogger(__name__)

#: How often survivors are frozen. A young collection scans everything tracked since the
#: last freeze, and most objects come from free lists without counting towards its
#: threshold: with 10,000 sessions and a freeze every 5 s the rare young collections found
#: 5 s of survivors, 17-22 ms of CPU each (docs/benchmarks.md, "The targeted tail").
FREEZE_SECONDS = 1.0
#: Buckets of the collector's pauses (seconds): a young collection takes microseconds, a
#: full one over a large unfrozen heap hundreds of milliseconds.
PAUSE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Collector:
    def __init__(
        self, churn_fraction: float = 0.25, churn_min: int = 1000, min_sessions: int = 500
    ) -> None:
        self.min_sessions = min_sessions
        self.frozen = False
        self.churn_fraction = churn_fraction  # closed sessions, as a share of open ones...
        self.churn_min = churn_min  # ...but at least this many, before a full collection
        self.closed = 0  # sessions closed since the last full collection
        self.collections = 0
        self.next_freeze = 0.0
        #: Every collection's pause, by generation (``/metrics``: the event loop stood
        #: still that long), timed by a ``gc.callbacks`` hook while :meth:`watch` is on.
        self.pauses = {str(g): Histogram(PAUSE_BUCKETS) for g in range(3)}
        self._started = 0.0

    def watch(self) -> None:
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses[str(info["generation"])].observe(time.perf_counter() - self._started)

    def session_closed(self) -> None:
        self.closed += 1

    def tick(self, now_mono: float, open_sessions: int) -> None:
        if now_mono < self.next_freeze:
            return
        self.next_freeze = now_mono + FREEZE_SECONDS
        if open_sessions < self.min_sessions:
            if self.frozen:
                gc.unfreeze()  # the collector's own schedule again
                self.frozen = False
            return
        if self.closed >= max(self.churn_min, self.churn_fraction * open_sessions):
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            self.closed = 0
            self.collections += 1
            log.info(
                "full collection after session churn: %d objects in %.0f ms",
                found,
                (time.perf_counter() - started) * 1000,
            )
        gc.freeze()
        self.frozen = True
