"""Pure decisions about positions; no I/O, unit-tested (as centrifuge's internal/recovery)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable


async def truncation_target(
    pending_from: Callable[[int], Awaitable[int]], lo: int, hi: int, cap: int
) -> int:
    """The stream sequence from which exactly ``cap`` alerts are pending (newest kept).

    ``pending_from(seq)`` counts the device's alerts at or after ``seq``; it falls by at
    most one per sequence, so the largest ``seq`` with ``pending_from(seq) >= cap`` has
    exactly ``cap`` pending. Binary search: about log2(hi - lo) calls, no alert fetched.
    Requires ``pending_from(lo) > cap`` and ``pending_from(hi) == 0``.
    """
    if cap < 1:
        raise ValueError("cap must be at least 1")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if await pending_from(mid) >= cap:
            lo = mid
        else:
            hi = mid
    return lo
