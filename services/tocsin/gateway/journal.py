"""The positions journal: the acked floors of a gateway's live devices, saved in batches.

A live device's alerts never pass through its durable (live.py), so the durable learns the
device's acks only from a consumer reset, about 0.5 ms of nats-server CPU per device
(docs/architecture.md §4). Resetting every live device every ``TOCSIN_CHECKPOINT_SECONDS``
made the cost of holding devices grow with their number even when nothing changed for
them but one alert each interval. Instead, every interval, the gateway writes what its
devices acked since their queues last heard of it as a few messages in ``DEVICES``: the
sessions are spread over :data:`SHARDS` subjects by their consumer name, each message
holds ``{consumer: [floor, sent], ...}`` for the devices of its shard whose queue is
behind, and only a shard whose content changed is written. Holding idle devices costs
nothing; a paced broadcast to every device costs one publish per shard per interval.

Who reads it: a session that claims a device its previous owner did not let go of (the
owner's gateway was killed, or lost NATS; ownership.py) reads the last message of that
gateway's shard and starts from the journal's floor when it is past the queue's
(``DeviceQueues.open``). Every floor in the journal was acked by the device, so starting
from it repeats less and never skips what was not acked. The durables themselves still
follow their live devices, at most every ``TOCSIN_QUEUE_SAVE_SECONDS`` (60 s), and at
every close.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Iterable
from typing import Protocol

import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tocsin.core.naming import Names

from .device import Position

log = logging.getLogger(__name__)

#: Subjects a gateway's journal is spread over (a message each, at most, per interval).
#: 25,000 devices make about 400 entries of ~60 bytes per shard: far below max_msg_size.
SHARDS = 64
#: Shards written at once.
WRITES_AT_ONCE = 16
#: How long a journal read or write may take.
JOURNAL_TIMEOUT = 2.0
#: Sessions read for a snapshot between two yields to the event loop. Reading all 10,000
#: of a gateway in one go held the loop 14-33 ms every interval, the tail of the targeted
#: alerts of that moment (docs/benchmarks.md, "The targeted tail").
SNAPSHOT_BATCH = 500


def shard_of(consumer: str) -> int:
    return zlib.crc32(consumer.encode()) % SHARDS


class Journaled(Protocol):
    """What the journal needs of a session."""

    consumer: str
    saved_floor: int
    high_water: int

    @property
    def journal_floor(self) -> int | None: ...


class Journal:
    def __init__(self, js: JetStreamContext, names: Names, instance: str) -> None:
        self._js = js
        self._names = names
        self._instance = instance
        self._written: dict[int, bytes] = {}  # shard -> the body last written
        self.writes = 0

    def _subject(self, instance: str, shard: int) -> str:
        return self._names.positions_subject(instance, shard)

    def snapshot(self, sessions: Iterable[Journaled]) -> dict[int, bytes]:
        """The body of every shard whose content changed since it was last written."""
        shards: dict[int, dict[str, list[int]]] = {}
        for session in sessions:
            self._enter(shards, session)
        return self._changed(shards)

    async def snapshot_yielding(self, sessions: Iterable[Journaled]) -> dict[int, bytes]:
        """:meth:`snapshot`, yielding to the event loop every :data:`SNAPSHOT_BATCH`
        sessions. A session that closes meanwhile may still be in it: every floor it
        names was acked, whenever it was read."""
        shards: dict[int, dict[str, list[int]]] = {}
        for i, session in enumerate(sessions):
            self._enter(shards, session)
            if i % SNAPSHOT_BATCH == SNAPSHOT_BATCH - 1:
                await asyncio.sleep(0)
        return self._changed(shards)

    @staticmethod
    def _enter(shards: dict[int, dict[str, list[int]]], session: Journaled) -> None:
        floor = session.journal_floor
        if floor is not None:
            entries = shards.setdefault(shard_of(session.consumer), {})
            entries[session.consumer] = [floor, session.high_water]

    def _changed(self, shards: dict[int, dict[str, list[int]]]) -> dict[int, bytes]:
        # A shard with nothing behind any more is written empty once, so that its last
        # message does not go on naming devices that closed (harmless, but stale).
        for shard in self._written:
            shards.setdefault(shard, {})
        out = {}
        for shard, entries in shards.items():
            body = orjson.dumps(entries, option=orjson.OPT_SORT_KEYS)
            if self._written.get(shard, b"{}") != body:
                out[shard] = body
        return out

    async def write(self, sessions: Iterable[Journaled]) -> int:
        """Write the changed shards; return how many were written. A failed write is
        logged and tried again at the next interval (it is in :meth:`snapshot` again)."""
        changed = await self.snapshot_yielding(sessions)
        gate = asyncio.Semaphore(WRITES_AT_ONCE)
        failures: list[BaseException] = []

        async def one(shard: int, body: bytes) -> None:
            async with gate:
                try:
                    await self._js.publish(
                        self._subject(self._instance, shard), body, timeout=JOURNAL_TIMEOUT
                    )
                except Exception as exc:
                    failures.append(exc)
                    return
            if body == b"{}":
                self._written.pop(shard, None)
            else:
                self._written[shard] = body
            self.writes += 1

        await asyncio.gather(*(one(s, b) for s, b in changed.items()))
        if failures:
            raise failures[0]
        return len(changed)

    async def read(self, instance: str, consumer: str) -> Position | None:
        """What the journal of gateway ``instance`` last said of ``consumer`` (None:
        nothing, or not readable: the queue's own floor stands)."""
        try:
            msg = await asyncio.wait_for(
                self._js.get_last_msg(
                    self._names.devices_stream, self._subject(instance, shard_of(consumer))
                ),
                JOURNAL_TIMEOUT,
            )
        except NotFoundError:
            return None
        except Exception as exc:
            log.warning("%s: positions journal of %s not read: %s", consumer, instance, exc)
            return None
        try:
            entry = orjson.loads(msg.data or b"{}").get(consumer)
            if entry is None:
                return None
            floor, sent = int(entry[0]), int(entry[1])
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError):
            log.warning("%s: unreadable positions journal of %s", consumer, instance)
            return None
        if floor < 0 or sent < 0:
            return None
        return Position(floor, sent)
