"""The gateway's freeze policy, against the real garbage collector of this process."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tocsin.gateway.collector import FREEZE_SECONDS, Collector


@pytest.fixture
def thawed() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave the process as it was


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_freezes_only_with_many_sessions(thawed: None) -> None:
    c = Collector(min_sessions=500)
    c.tick(0.0, open_sessions=10)
    assert gc.get_freeze_count() == 0 and not c.frozen
    c.tick(FREEZE_SECONDS, open_sessions=600)
    assert gc.get_freeze_count() > 0 and c.frozen
    c.tick(2 * FREEZE_SECONDS, open_sessions=10)  # few again: back to the normal schedule
    assert gc.get_freeze_count() == 0 and not c.frozen


def test_churn_brings_a_full_collection_that_frees_frozen_cycles(thawed: None) -> None:
    c = Collector(churn_fraction=0.25, churn_min=3, min_sessions=1)
    leftover = Cycle()  # a closed session's cyclic leftovers, alive when frozen
    ref = weakref.ref(leftover)
    c.tick(0.0, open_sessions=8)
    assert c.frozen and c.collections == 0
    del leftover
    gc.collect()
    assert ref() is not None  # frozen: collections skip it (the cost, bounded below)
    for _ in range(2):
        c.session_closed()
    c.tick(FREEZE_SECONDS, open_sessions=8)  # 2 closed < max(3, 0.25 * 8): not yet
    assert c.collections == 0 and ref() is not None
    c.session_closed()
    c.tick(2 * FREEZE_SECONDS, open_sessions=8)
    assert c.collections == 1 and c.closed == 0 and c.frozen
    assert ref() is None  # unfrozen, collected, frozen again
    c.tick(2 * FREEZE_SECONDS + 0.1, open_sessions=8)  # not due again yet
    assert c.collections == 1


def test_every_collection_is_timed_by_generation_while_watched() -> None:
    c = Collector()
    c.watch()
    try:
        c.watch()  # once only: a second hook would count every pause twice
        gc.collect(0)
        gc.collect(2)
        assert c.pauses["0"].count == 1 and c.pauses["1"].count == 0
        assert c.pauses["2"].count == 1 and c.pauses["2"].sum > 0
    finally:
        c.unwatch()
    gc.collect(2)
    assert c.pauses["2"].count == 1  # not watched any more
    assert c._on_gc not in gc.callbacks


def test_survivors_are_frozen_every_second(thawed: None) -> None:
    """A young collection scans everything tracked since the last freeze: with 10,000
    sessions, 5 s of survivors took 10-22 ms (docs/benchmarks.md, step 5 of issue 17)."""
    c = Collector(min_sessions=1)
    c.tick(0.0, open_sessions=8)
    frozen = gc.get_freeze_count()
    kept = [[i] for i in range(1000)]  # survivors tracked after the freeze
    c.tick(1.0, open_sessions=8)
    assert gc.get_freeze_count() >= frozen + len(kept)  # frozen a second later
