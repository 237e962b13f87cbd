"""The in-flight window of one connection: pure bookkeeping of sent and unacked alerts."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tocsin.gateway.window import InFlight, Window


def item(seq: int, sent_at: float = 0.0, expires: float | None = None) -> InFlight:
    return InFlight(seq, f'{{"alert_id": {seq}}}'.encode(), expires, sent_at)


def test_empty_window() -> None:
    w = Window(3)
    assert w.room == 3
    assert (w.floor, w.next_seq) == (0, 1)
    assert w.is_new(1) and w.is_new(50)
    assert not w.is_new(0)
    assert not w.held_full(1e9, 30.0)


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


def test_held_full_counts_from_the_item_that_filled_the_window() -> None:
    w = Window(3)
    w.take(item(1, sent_at=0.0), track=True)  # long unacked, but there is room
    w.take(item(2, sent_at=10.0), track=True)
    assert not w.held_full(1e9, 30.0)
    w.take(item(3, sent_at=20.0), track=True)  # full from here
    assert w.full_since == 20.0
    assert not w.held_full(49.9, 30.0)
    assert w.held_full(50.0, 30.0)


def test_an_ack_that_makes_room_restarts_the_clock() -> None:
    w = Window(2)
    w.take(item(1, sent_at=0.0), track=True)
    w.take(item(2, sent_at=1.0), track=True)
    w.ack(0)  # nothing new acknowledged: still full, the clock runs on
    assert w.held_full(31.0, 30.0)
    w.ack(1)  # a slow client that acks is not held full
    assert w.full_since is None and not w.held_full(1e9, 30.0)
    w.take(item(3, sent_at=40.0), track=True)
    assert not w.held_full(69.9, 30.0) and w.held_full(70.0, 30.0)


def test_untracked_items_never_fill_the_window() -> None:
    w = Window(1)  # ack_mode=auto: written counts as delivered
    for seq in (1, 2, 3):
        w.take(item(seq), track=False)
    assert w.full_since is None and not w.held_full(1e9, 1.0)


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


def test_expiry_that_makes_room_restarts_the_clock() -> None:
    w = Window(2)
    w.take(item(1, expires=50.0), track=True)
    w.take(item(2, sent_at=5.0), track=True)
    assert w.full_since == 5.0
    w.drop_expired(50.0)
    assert w.full_since is None


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
    w = Window(6)  # small: the ops fill and empty it
    unacked: set[int] = set()
    floor = skipped = 0
    sent: set[int] = set()
    for op, n, track in ops:
        if op == "take":
            if track and not w.room:
                continue  # the session sends nothing tracked into a full window
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
        assert w.room == 6 - len(unacked)
        assert (w.full_since is not None) == (len(unacked) == 6)
        assert all(not w.is_new(s) for s in sent)
        assert w.is_new(w.next_seq)
