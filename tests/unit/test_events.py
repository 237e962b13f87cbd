"""gateway.events.Event behaves as asyncio.Event, waiters in a list."""

from __future__ import annotations

import asyncio
import sys

from tocsin.gateway.events import Event


async def test_it_wakes_every_waiter_and_can_be_cleared_and_set_again() -> None:
    event = Event()
    assert not event.is_set()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    event.clear()
    late = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    assert not late.done()
    late.cancel()  # a cancelled waiter leaves no trace
    await asyncio.gather(late, return_exceptions=True)
    assert event._waiters == []
    event.set()
    assert await event.wait()


def test_an_idle_event_is_smaller_than_asyncios() -> None:
    ours, theirs = Event(), asyncio.Event()
    assert sys.getsizeof(ours._waiters) < sys.getsizeof(theirs._waiters) / 5
