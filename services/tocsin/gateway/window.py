"""The in-flight window of one connection: what was sent and not yet acknowledged.

Pure bookkeeping, no I/O: the session decides what to send, the window remembers it,
answers acks and says what is due for redelivery.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .recovery import backoff_delay


@dataclass(slots=True)
class InFlight:
    seq: int
    data: bytes  # the alert JSON as stored in ALERTS
    expires: float | None
    sent_at: float = 0.0
    attempts: int = 0
    js_msg: Any = None  # the durable's message for this seq, when it came from the backlog


@dataclass
class Window:
    """Sequences ``floor < seq < next_seq`` have been sent; those still in ``items`` are
    unacknowledged. ``floor`` only grows, by cumulative acks."""

    capacity: int
    floor: int = 0
    next_seq: int = 1
    items: OrderedDict[int, InFlight] = field(default_factory=OrderedDict)
    skipped: int = 0  # highest seq passed over without sending

    def _settle(self) -> None:
        """A passed-over seq counts as acknowledged once nothing sent before it is unacked."""
        if self.skipped > self.floor and (not self.items or next(iter(self.items)) > self.skipped):
            self.floor = self.skipped

    @property
    def room(self) -> int:
        return self.capacity - len(self.items)

    def is_new(self, seq: int) -> bool:
        return seq >= self.next_seq and seq > self.floor

    def take(self, item: InFlight, track: bool) -> None:
        """Record that ``item`` is being sent for the first time."""
        self.next_seq = item.seq + 1
        if track:
            self.items[item.seq] = item

    def skip(self, seq: int, settle: bool = True) -> None:
        """``seq`` will never be sent (it expired, or the subscription excludes it): it is
        settled, as if acknowledged, once everything sent before it is; ``settle=False``
        leaves that to a later :meth:`ack` (ack_mode=auto, where the sender is behind)."""
        self.next_seq = max(self.next_seq, seq + 1)
        if settle:
            self.skipped = max(self.skipped, seq)
            self._settle()

    def ack(self, seq: int) -> list[InFlight]:
        """Cumulative ack: remove and return everything at or below ``seq``."""
        if seq <= self.floor:
            return []
        self.floor = seq
        done = []
        while self.items:
            first = next(iter(self.items))
            if first > seq:
                break
            done.append(self.items.pop(first))
        self._settle()
        return done

    def due(self, now: float, schedule: list[float]) -> list[InFlight]:
        """Unacked items whose backoff has elapsed, oldest first."""
        return [
            item
            for item in self.items.values()
            if now - item.sent_at >= backoff_delay(schedule, item.attempts)
        ]

    def drop_expired(self, now: float) -> None:
        for seq in [s for s, i in self.items.items() if i.expires is not None and i.expires <= now]:
            del self.items[seq]
