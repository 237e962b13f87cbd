"""Pure position decisions: where to cut a backlog, how long to wait before redelivery."""

from __future__ import annotations

import bisect
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tocsin.gateway.recovery import truncation_target


class Backlog:
    """A device's matching stream sequences (with gaps); counts what ``pending_from`` is asked."""

    def __init__(self, seqs: list[int]) -> None:
        self.seqs = sorted(seqs)
        self.calls = 0

    async def pending_from(self, seq: int) -> int:
        self.calls += 1
        return len(self.seqs) - bisect.bisect_left(self.seqs, seq)

    def count(self, seq: int) -> int:
        return len(self.seqs) - bisect.bisect_left(self.seqs, seq)


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Drive a coroutine that never suspends (pending_from here does no I/O)."""
    try:
        coro.send(None)
    except StopIteration as done:
        return int(done.value)
    coro.close()
    raise AssertionError("truncation_target suspended without I/O")


def target(backlog: Backlog, lo: int, hi: int, cap: int) -> int:
    fn: Callable[[int], Awaitable[int]] = backlog.pending_from
    return run(truncation_target(fn, lo, hi, cap))


async def test_truncation_target_keeps_newest_cap() -> None:
    backlog = Backlog([3, 4, 7, 8, 9, 15, 20, 21, 40])
    result = await truncation_target(backlog.pending_from, 2, 41, 4)
    assert result == 15  # 15, 20, 21, 40 are kept
    assert backlog.count(result) == 4


async def test_truncation_target_cap_one_is_last() -> None:
    backlog = Backlog([5, 6, 100])
    assert await truncation_target(backlog.pending_from, 4, 101, 1) == 100


async def test_truncation_target_contiguous() -> None:
    backlog = Backlog(list(range(1, 1001)))
    assert await truncation_target(backlog.pending_from, 1, 1001, 100) == 901


async def test_truncation_target_refuses_cap_below_one() -> None:
    backlog = Backlog([1, 2, 3])
    with pytest.raises(ValueError, match="cap"):
        await truncation_target(backlog.pending_from, 1, 4, 0)


async def test_truncation_target_calls_are_logarithmic_on_a_huge_stream() -> None:
    backlog = Backlog(list(range(1, 10**9, 997)))
    cap = 100
    result = await truncation_target(backlog.pending_from, 1, 10**9, cap)
    assert result == backlog.seqs[-cap]
    assert backlog.calls <= math.ceil(math.log2(10**9)), backlog.calls


@st.composite
def backlogs(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    seqs = draw(st.sets(st.integers(1, 5000), min_size=2, max_size=300))
    ordered = sorted(seqs)
    cap = draw(st.integers(1, len(ordered) - 1))  # requires pending_from(lo) > cap
    lo = draw(st.integers(0, ordered[0]))
    hi = ordered[-1] + 1 + draw(st.integers(0, 50))  # pending_from(hi) == 0
    return ordered, lo, hi, cap


@given(backlogs())
def test_truncation_target_is_largest_seq_with_exactly_cap_pending(
    case: tuple[list[int], int, int, int],
) -> None:
    seqs, lo, hi, cap = case
    backlog = Backlog(seqs)
    result = target(backlog, lo, hi, cap)
    assert lo <= result < hi
    assert backlog.count(result) == cap
    assert backlog.count(result + 1) < cap  # the largest such sequence
    assert result == seqs[-cap]  # it is itself a kept alert: nothing newer is cut
    assert backlog.calls <= max(1, math.ceil(math.log2(hi - lo))), (backlog.calls, hi - lo)
