"""The positions journal's snapshot, read in steps between which the event loop runs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from tocsin.core.naming import Names
from tocsin.gateway.journal import SNAPSHOT_BATCH, Journal, shard_of


@dataclass
class Held:
    """What the journal reads of a session (journal.Journaled)."""

    consumer: str
    saved_floor: int
    high_water: int
    floor: int

    @property
    def journal_floor(self) -> int | None:
        return self.floor if self.floor > self.saved_floor else None


def sessions(n: int) -> list[Held]:
    # every third device acked past what its queue knows
    return [Held(f"d{i}", 10, 30 + i, 20 if i % 3 == 0 else 10) for i in range(n)]


async def test_the_loop_runs_between_steps_and_the_bodies_are_the_same() -> None:
    held = sessions(4 * SNAPSHOT_BATCH + 7)
    journal = Journal(None, Names("t"), "gw")  # type: ignore[arg-type]  # no NATS: no write
    turns = 0
    done = False

    async def other() -> None:  # what else the loop runs: a delivery, a ping
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    before = turns
    bodies = await journal.snapshot_yielding(held)
    done = True
    await task
    assert turns - before >= 4  # it yielded after every SNAPSHOT_BATCH sessions
    assert bodies == journal.snapshot(held)
    behind = {s.consumer for s in held if s.journal_floor is not None}
    named = {c for body in bodies.values() for c in orjson.loads(body)}
    assert named == behind
    for shard, body in bodies.items():
        for consumer, (floor, sent) in orjson.loads(body).items():
            assert shard_of(consumer) == shard and floor == 20 and sent >= 30
