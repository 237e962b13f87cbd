"""The in-flight window of one connection: pure bookkeeping of sent and unacked alerts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tocsin.gateway.window import InFlight, Window

SCHEDULE = [1.0, 2.0, 4.0]


def item(seq: int, sent_at: float = 0.0, expires: float | None = None) -> InFlight:
    return InFlight(seq, f'{{"alert_id": {seq}}}'.encode(), expires, sent_at, 1)


def test_empty_window() -> None:
    w = Window(3)
    assert w.room == 3
    assert (w.floor, w.next_seq) == (0, 1)
    assert w.is_new(1) and w.is_new(50)
    assert not w.is_new(0)
    assert w.due(1e9, SCHEDULE) == []


def test_take_tracked_uses_room_and_moves_next_seq() -> None:
    w = Window(3)
    w.take(item(4), track=True)
    assert w.room == 2
    assert w.next_seq == 5
    assert not w.is_new(4) and not w.is_new(3)
    assert w.is_new(5)
    assert list(w.items) == [4]


def test_take_untracked_moves_next_seq_only() -> None:
    w = Window(3)
    w.take(item(7), track=False)
    assert w.room == 3
    assert w.next_seq == 8
    assert not w.items
    assert not w.is_new(7)


def test_room_can_reach_zero() -> None:
    w = Window(2)
    w.take(item(1), track=True)
    w.take(item(2), track=True)
    assert w.room == 0
    w.ack(1)
    assert w.room == 1


def test_ack_is_cumulative_and_ordered() -> None:
    w = Window(10)
    for seq in (1, 2, 4, 5, 9):
        w.take(item(seq), track=True)
    done = w.ack(5)
    assert [i.seq for i in done] == [1, 2, 4, 5]
    assert w.floor == 5
    assert list(w.items) == [9]
    assert w.room == 9


def test_ack_between_items_covers_gap() -> None:
    w = Window(10)
    for seq in (10, 20, 30):
        w.take(item(seq), track=True)
    assert [i.seq for i in w.ack(25)] == [10, 20]
    assert w.floor == 25
    assert list(w.items) == [30]


def test_stale_ack_changes_nothing() -> None:
    w = Window(10)
    for seq in (1, 2, 3):
        w.take(item(seq), track=True)
    w.ack(2)
    assert w.ack(2) == []
    assert w.ack(1) == []
    assert w.floor == 2
    assert list(w.items) == [3]


def test_acked_seq_is_not_new() -> None:
    """After a reconnect the window starts at the durable's floor: older seqs are not new."""
    w = Window(10, floor=41, next_seq=42)
    assert not w.is_new(41) and not w.is_new(7)
    assert w.is_new(42)


def test_skip_moves_next_seq_forward_only() -> None:
    w = Window(10)
    w.take(item(1), track=True)
    w.skip(3)
    assert w.next_seq == 4
    assert not w.is_new(3)
    w.skip(2)
    assert w.next_seq == 4
    assert w.room == 9  # a skipped seq is never in flight


def test_ack_covers_skipped_seq() -> None:
    w = Window(10)
    w.take(item(1), track=True)
    w.skip(2)
    w.take(item(3), track=True)
    assert [i.seq for i in w.ack(3)] == [1, 3]
    assert not w.items


def test_due_waits_for_backoff() -> None:
    w = Window(10)
    first = item(1, sent_at=100.0)
    w.take(first, track=True)
    assert w.due(100.0, SCHEDULE) == []
    assert w.due(100.999, SCHEDULE) == []
    assert w.due(101.0, SCHEDULE) == [first]
    # the session redelivers: one more attempt, a longer wait
    first.attempts, first.sent_at = 2, 101.0
    assert w.due(102.5, SCHEDULE) == []
    assert w.due(103.0, SCHEDULE) == [first]


def test_due_last_backoff_step_repeats() -> None:
    w = Window(10)
    late = item(1, sent_at=0.0)
    late.attempts = 9
    w.take(late, track=True)
    assert w.due(3.9, SCHEDULE) == []
    assert w.due(4.0, SCHEDULE) == [late]


def test_due_is_oldest_first_and_skips_acked() -> None:
    w = Window(10)
    items = [item(seq, sent_at=float(seq)) for seq in (1, 2, 3, 4)]
    for i in items:
        w.take(i, track=True)
    w.ack(1)
    assert [i.seq for i in w.due(10.0, SCHEDULE)] == [2, 3, 4]
    assert [i.seq for i in w.due(3.0, SCHEDULE)] == [2]


def test_drop_expired() -> None:
    w = Window(10)
    w.take(item(1, expires=50.0), track=True)
    w.take(item(2), track=True)
    w.take(item(3, expires=60.0), track=True)
    w.drop_expired(49.9)
    assert list(w.items) == [1, 2, 3]
    w.drop_expired(50.0)  # expiry is inclusive
    assert list(w.items) == [2, 3]
    assert w.room == 8
    w.drop_expired(1e12)
    assert list(w.items) == [2]
    assert w.floor == 0  # expiry is not an ack
    assert w.due(1e12, SCHEDULE) == [w.items[2]]


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("take"), st.integers(1, 3), st.booleans()),
        st.tuples(st.just("skip"), st.integers(1, 3), st.booleans()),
        st.tuples(st.just("ack"), st.integers(0, 30), st.just(False)),
    ),
    max_size=40,
)


@given(OPS)
def test_window_against_model(ops: list[tuple[str, int, bool]]) -> None:
    """Random sends (with gaps), skips and acks against a plain set model. A skipped seq
    settles (the floor moves to it) once nothing sent before it is unacked."""
    w = Window(1000)
    unacked: set[int] = set()
    floor = skipped = 0
    sent: set[int] = set()
    for op, n, track in ops:
        if op == "take":
            seq = w.next_seq + n - 1
            assert w.is_new(seq)
            w.take(item(seq), track)
            sent.add(seq)
            if track:
                unacked.add(seq)
        elif op == "skip":
            seq = w.next_seq + n - 1
            w.skip(seq, settle=track)
            if track:
                skipped = max(skipped, seq)
        else:
            seq = min(n, w.next_seq - 1)  # the session refuses acks of unsent seqs
            done = [i.seq for i in w.ack(seq)]
            expected = sorted(s for s in unacked if s <= seq) if seq > floor else []
            assert done == expected
            unacked -= set(done)
            floor = max(floor, seq)
        if skipped > floor and all(u > skipped for u in unacked):
            floor = skipped
        assert w.floor == floor
        assert list(w.items) == sorted(unacked)
        assert all(s > w.floor for s in w.items)
        assert w.room == 1000 - len(unacked)
        assert all(not w.is_new(s) for s in sent)
        assert w.is_new(w.next_seq)
