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
