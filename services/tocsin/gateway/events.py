"""``asyncio.Event`` with its waiters in a list: what a gateway holds per connection.

``asyncio.Event`` keeps its waiters in a ``collections.deque``, 760 bytes even when empty
(CPython 3.11); a connection holds seven events (its session's and its claim's), which
tracemalloc counted as 6 KiB of the gateway's ~43 KiB per connection. An event here is
waited on by one task, two or three at most, so a list (56 bytes empty) does the same
work: ``asyncio.Event`` only appends to, removes from and iterates over its waiters.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Event(asyncio.Event):
    def __init__(self) -> None:  # asyncio.Event's own, with a list for the deque
        self._waiters: Any = []
        self._value = False

    def future(self) -> asyncio.Future[bool]:
        """A future done when the event is set (at once if it is): what ``wait()`` awaits,
        without a task around it. It stays among the waiters (``set`` skips done ones)."""
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._value:
            fut.set_result(True)
        else:
            self._waiters.append(fut)
        return fut
