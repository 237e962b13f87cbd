"""Which alerts the application has handled: the dedupe store (docs/protocol.md §5, §7).

The client asks :class:`SeenStore` before it hands an alert over and tells it once the
application is done with it. The in-memory default is bounded and forgets after
``keep_seconds``; an application that must not show an alert twice across restarts
implements the protocol on its own storage (SQLite, shared preferences, a file).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Protocol, runtime_checkable

#: How long an id is remembered by default: the server's default retention
#: (``TOCSIN_RETENTION_HOURS`` = 24): a repeat can only come from the device's queue.
DEFAULT_KEEP_SECONDS = 24 * 3600.0


@runtime_checkable
class SeenStore(Protocol):
    """The persistence hook. Ids are strings: the integer ``1042`` and ``"1042"`` are one
    alert (docs/protocol.md §2), and the client passes both as ``"1042"``."""

    async def contains(self, alert_id: str) -> bool:
        """True if the alert was handled before (the client then skips it and acks it)."""
        ...

    async def add(self, alert_id: str, forget_after: float) -> None:
        """Remember the handled alert until ``forget_after`` (unix seconds) at least."""
        ...


class MemorySeenStore:
    """The default: at most ``max_ids`` ids, each kept until its ``forget_after``; when
    full, the oldest added is forgotten first."""

    def __init__(self, max_ids: int = 10_000) -> None:
        if max_ids < 1:
            raise ValueError("max_ids: must be 1 or more")
        self.max_ids = max_ids
        self._ids: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._ids)

    async def contains(self, alert_id: str) -> bool:
        until = self._ids.get(alert_id)
        if until is None:
            return False
        if until < time.time():
            del self._ids[alert_id]
            return False
        return True

    async def add(self, alert_id: str, forget_after: float) -> None:
        self._ids.pop(alert_id, None)
        self._ids[alert_id] = forget_after
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
