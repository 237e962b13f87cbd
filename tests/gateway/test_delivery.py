"""Delivery, order, catch-up and acks over real sockets against a real nats-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.context import sweep_seconds
from tocsin.schemas.codes import Close

from ..support import Client, RunningGateway, alert, append, eventually, start_gateway, token


async def test_live_alert_arrives_with_stream_seq(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("alice", ("KE",)))
    hello = await client.next()
    assert hello["type"] == "connection_established"
    assert hello["user_id"] == "alice" and hello["client_id"] == "phone"
    assert hello["pending"] == 0 and hello["ack_mode"] == "client"
    body = alert("KE-30")
    ack = await append(js, names, body)
    [frame] = await client.alerts(1)
    assert frame["seq"] == ack.seq
    assert frame["alert"]["alert_id"] == body["alert_id"]
    assert frame["redelivered"] is False
    await client.close()


async def test_regions_bound_delivery(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("bob", ("UG-102",)))
    await client.next("connection_established")
    await append(js, names, alert("UG-103"))  # a sibling district: not for bob
    await append(js, names, alert("UG"))  # country-wide: not within UG-102
    await append(js, names, alert("KE-30"))
    wanted = await append(js, names, alert("UG-102"))
    [frame] = await client.alerts(1)
    assert frame["seq"] == wanted.seq  # the first alert bob sees is his own district's
    await client.close()


async def test_live_order_is_publish_order(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token(), ack_mode="auto")
    await client.next("connection_established")
    acks = [await append(js, names, alert("KE-30")) for _ in range(200)]
    frames = await client.alerts(200)
    assert [f["seq"] for f in frames] == [a.seq for a in acks]
    await client.close()


async def test_catch_up_after_disconnect_in_order_before_live(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    tok = token("carol", ("KE",))
    await Client.introduce(gateway.ws_url, tok)
    missed = [await append(js, names, alert("KE-30")) for _ in range(3)]
    again = await Client.connect(gateway.ws_url, tok)
    hello = await again.next("connection_established")
    assert hello["pending"] == 3
    live = await append(js, names, alert("KE-01"))
    frames = await again.alerts(4, ack=True)
    assert [f["seq"] for f in frames] == [m.seq for m in missed] + [live.seq]
    await again.close()


async def test_an_unacked_alert_is_not_sent_again_on_an_open_connection(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """TCP delivers or breaks: nothing is resent on a connection that stays open (the
    durable's backoff, 1 s in tests, once drove resends here; CONTRACT §6)."""
    tok = token("dave")
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    sent = await append(js, names, alert())
    first = await client.next("alert")
    assert first["seq"] == sent.seq and not first["redelivered"]
    [session] = [s for s in gateway.gw.sessions if s.device.user_id == "dave"]
    item = session.window.items[sent.seq]
    backoff = gateway.settings.redelivery_backoff[0]
    # The ticker has swept this session at least twice past the old resend delay: anything
    # it enqueued then goes out before the answer to the get_stats sent after.
    sweep = sweep_seconds(gateway.settings.heartbeat_seconds)
    swept_from = item.sent_at + 2 * backoff + sweep

    def swept() -> bool:
        return session.next_sweep - sweep >= swept_from

    await eventually(swept, what="two sweeps of the session past the old resend delay")
    await client.send({"type": "get_stats"})
    stats = await client.next()
    assert stats["type"] == "connection_stats", f"sent again: {stats}"
    assert stats["inflight"] == 1 and stats["alerts_sent"] == 1
    await client.send({"type": "ack", "seq": sent.seq})
    await client.close()
    # after the ack, a reconnect brings nothing old: the next alert is the new one
    back = await Client.connect(gateway.ws_url, tok)
    hello = await back.next("connection_established")
    assert hello["pending"] == 0
    fresh = await append(js, names, alert())
    [frame] = await back.alerts(1)
    assert frame["seq"] == fresh.seq
    await back.close()


async def test_a_window_held_full_without_acks_closes_with_4408_and_resumes(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """The client holds every alert it may have unacked for TOCSIN_ACK_TIMEOUT_SECONDS:
    closed with 4408; its next connection gets them again, flagged, then the rest."""
    running = await start_gateway(make_settings(max_inflight=2, ack_timeout_seconds=0.5))
    try:
        tok = token("gus")
        client = await Client.connect(running.ws_url, tok)
        await client.next("connection_established")
        seqs = [(await append(js, names, alert())).seq for _ in range(3)]
        got = await client.alerts(2)  # the window is full: the third waits in the queue
        assert [f["seq"] for f in got] == seqs[:2]
        assert await client.wait_closed() == Close.ACK_TIMEOUT
        left = []
        while not client.frames.empty():
            left.append(client.frames.get_nowait())
        assert [f for f in left if f["type"] == "alert"] == [], "sent again or past the window"
        await client.close()
        back = await Client.connect(running.ws_url, tok)
        hello = await back.next("connection_established")
        assert hello["pending"] == 3
        again = await back.alerts(3, ack=True)
        assert [f["seq"] for f in again] == seqs
        assert [f["redelivered"] for f in again] == [True, True, False]
        await back.close()
    finally:
        await running.stop()


async def test_unacked_alerts_come_back_after_reconnect_flagged(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    tok = token("erin")
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    seqs = [(await append(js, names, alert())).seq for _ in range(3)]
    frames = await client.alerts(3)
    await client.send({"type": "ack", "seq": frames[0]["seq"]})  # only the first
    await client.send({"type": "get_stats"})  # a round trip: the ack has been processed
    stats = await client.next("connection_stats")
    assert stats["acked_seq"] == seqs[0]
    await client.close()
    back = await Client.connect(gateway.ws_url, tok)
    hello = await back.next("connection_established")
    assert hello["pending"] == 2
    again = await back.alerts(2, ack=True)
    assert [f["seq"] for f in again] == seqs[1:]
    assert all(f["redelivered"] for f in again)
    await back.close()


async def test_cumulative_ack_acknowledges_everything_before(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    tok = token("frank")
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    seqs = [(await append(js, names, alert())).seq for _ in range(5)]
    await client.alerts(5)
    await client.send({"type": "ack", "seq": seqs[-1]})  # one ack for all five
    await client.send({"type": "get_stats"})
    stats = await client.next("connection_stats")
    assert stats["acked_seq"] == seqs[-1] and stats["inflight"] == 0
    await client.close()
    back = await Client.connect(gateway.ws_url, tok)
    assert (await back.next("connection_established"))["pending"] == 0
    await back.close()


async def test_ack_of_unsent_seq_is_an_error_and_changes_nothing(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("gina"))
    await client.next("connection_established")
    await client.send({"type": "ack", "seq": 10_000_000})
    err = await client.next("error")
    assert err["code"] == "invalid_ack" and "seq" in err["detail"]
    sent = await append(js, names, alert())
    [frame] = await client.alerts(1)
    assert frame["seq"] == sent.seq
    await client.close()


async def test_new_token_regions_update_the_queue_in_place(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """A token with other regions changes the durable's filters, not its position."""
    client = await Client.connect(gateway.ws_url, token("vera", ("KE",)))
    await client.next("connection_established")
    first = await append(js, names, alert("KE-30"))
    second = await append(js, names, alert("KE-01"))
    frames = await client.alerts(2)
    await client.send({"type": "ack", "seq": first.seq})  # the second stays unacked
    await client.send({"type": "get_stats"})
    await client.next("connection_stats")
    await client.close()
    uganda = await append(js, names, alert("UG-102"))
    wider = await Client.connect(gateway.ws_url, token("vera", ("KE", "UG-102")))
    hello = await wider.next("connection_established")
    assert hello["pending"] == 2 and hello["regions"] == ["KE", "UG-102"]
    again = await wider.alerts(2, ack=True)
    assert [f["seq"] for f in again] == [second.seq, uganda.seq]
    assert again[0]["redelivered"] is True and again[1]["redelivered"] is False
    assert frames[1]["seq"] == second.seq
    info = await js.consumer_info(names.alerts_stream, names.device_consumer("vera", "phone"))
    assert sorted(info.config.filter_subjects or []) == names.region_filters(["KE", "UG-102"])
    await wider.close()


async def test_a_new_device_gets_the_alert_published_during_its_handshake(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """An alert the gateway's feed offered the session while it was opening its new queue
    (after the claim, before ``connection_established``) is the device's: its queue starts
    before it, and it arrives once, live."""
    queues = gateway.gw.queues
    opening = queues.open
    published: list[int] = []

    async def open_after_an_alert(*args: Any, **kwargs: Any) -> Any:
        seq = (await append(js, names, alert("KE-30"))).seq
        published.append(seq)
        await eventually(lambda: gateway.gw.feed.last_seq >= seq, what="the feed has it")
        return await opening(*args, **kwargs)

    queues.open = open_after_an_alert  # type: ignore[method-assign]
    client = await Client.connect(gateway.ws_url, token("nia", ("KE",)))
    hello = await client.next("connection_established")
    queues.open = opening  # type: ignore[method-assign]
    assert hello["pending"] == 0
    [frame] = await client.alerts(1, ack=True)
    assert frame["seq"] == published[0]
    await client.nothing_more(0.5)
    await client.close()
