"""The in-flight window of one connection: what was sent and not yet acknowledged.

Pure bookkeeping, no I/O: the session decides what to send, the window remembers it,
answers acks and says whether the client is holding it full (nothing is resent on an open
connection: TCP delivers or breaks; after a reconnect the durable sends what is unacked).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class InFlight:
    seq: int
    data: bytes  # the alert JSON as stored in ALERTS
    expires: float | None
    sent_at: float = 0.0
    js_msg: Any = None  # the durable's message for this seq, when it came from the backlog


@dataclass(slots=True)
class Window:
    """Sequences ``floor < seq < next_seq`` have been sent; those still in ``items`` are
    unacknowledged. ``floor`` only grows, by cumulative acks."""

    capacity: int
    floor: int = 0
    next_seq: int = 1
    items: OrderedDict[int, InFlight] = field(default_factory=OrderedDict)
    skipped: int = 0  # highest seq passed over without sending
    #: When the tracked items last filled the window (the ``sent_at`` of the one that
    #: filled it); None while there is room. Any ack that makes room clears it.
    full_since: float | None = None

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
            if self.full_since is None and len(self.items) >= self.capacity:
                self.full_since = item.sent_at

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
        self._has_room()
        return done

    def _has_room(self) -> None:
        if len(self.items) < self.capacity:
            self.full_since = None

    def held_full(self, now: float, timeout: float) -> bool:
        """The window has been full for ``timeout`` seconds with no ack making room: the
        client holds alerts it does not acknowledge, and nothing more can be sent to it."""
        return self.full_since is not None and now - self.full_since >= timeout

    def drop_expired(self, now: float) -> None:
        for seq in [s for s, i in self.items.items() if i.expires is not None and i.expires <= now]:
            del self.items[seq]
        self._has_room()
