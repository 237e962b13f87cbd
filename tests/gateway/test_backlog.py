"""The offline queue: cap with backlog_truncated, expiry, duplicates, and the hand-over race."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import Client, RunningGateway, alert, append, eventually, start_gateway, token


async def test_offline_cap_keeps_newest_and_says_how_many_were_dropped(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    running = await start_gateway(make_settings(offline_queue_max=5))
    try:
        tok = token("hana")
        await Client.introduce(running.ws_url, tok)
        seqs = [(await append(js, names, alert())).seq for _ in range(12)]
        await append(js, names, alert("UG-102"))  # not hana's: must not count
        back = await Client.connect(running.ws_url, tok)
        hello = await back.next()
        assert hello["type"] == "connection_established" and hello["pending"] == 5
        truncated = await back.next()
        assert truncated == {"type": "backlog_truncated", "dropped": 7}
        frames = await back.alerts(5, ack=True)
        assert [f["seq"] for f in frames] == seqs[-5:]
        await back.close()
    finally:
        await running.stop()


async def test_duplicate_alert_id_is_stored_and_delivered_once(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("ivan"), ack_mode="auto")
    await client.next("connection_established")
    body = alert()
    first = await append(js, names, body)
    repeat = await append(js, names, body)
    assert repeat.duplicate and repeat.seq == first.seq
    sentinel = await append(js, names, alert())
    frames = await client.alerts(2)
    assert [f["seq"] for f in frames] == [first.seq, sentinel.seq]
    await client.close()


async def test_expired_alerts_are_never_sent(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    tok = token("jane")
    client = await Client.connect(gateway.ws_url, tok)
    await client.next("connection_established")
    await client.close()
    soon = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    short = await append(js, names, alert(expiry_time=soon))
    keeps = await append(
        js, names, alert(expiry_time=(datetime.now(UTC) + timedelta(hours=1)).isoformat())
    )

    async def expired() -> bool:
        return datetime.now(UTC).isoformat() > soon

    from ..support import eventually

    await eventually(expired, timeout=5, what="the first alert's expiry")
    back = await Client.connect(gateway.ws_url, tok)
    await back.next("connection_established")
    [frame] = await back.alerts(1, ack=True)
    assert frame["seq"] == keeps.seq and frame["seq"] != short.seq
    await back.close()


async def test_handover_from_backlog_to_live_has_no_gap_and_no_reorder(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """Publish continuously while a device reconnects: every alert exactly once, in order."""
    tok = token("kim")
    await Client.introduce(gateway.ws_url, tok)
    published: list[int] = []
    stop = asyncio.Event()

    async def publisher() -> None:
        while not stop.is_set() and len(published) < 600:
            published.append((await append(js, names, alert())).seq)

    task = asyncio.create_task(publisher())
    await asyncio.sleep(0)  # let it start; correctness does not depend on timing
    while len(published) < 50:
        await asyncio.sleep(0.01)
    back = await Client.connect(gateway.ws_url, tok, ack_mode="client")
    await back.next("connection_established")
    got: list[int] = []
    while len(got) < 300:
        frame = await back.next("alert")
        got.append(frame["seq"])
        await back.send({"type": "ack", "seq": frame["seq"]})
    stop.set()
    await task
    while got[-1] < published[-1]:
        frame = await back.next("alert")
        got.append(frame["seq"])
        await back.send({"type": "ack", "seq": frame["seq"]})
    assert got == sorted(set(got)), "reordered or duplicated"
    assert got == published[: len(got)] and got[-1] == published[-1], "gap"
    await back.close()


@pytest.mark.parametrize("waiting_limit", [1_000, 8])
async def test_slow_reader_gets_a_burst_larger_than_its_window_in_order(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    monkeypatch: pytest.MonkeyPatch,
    waiting_limit: int,
) -> None:
    """A window of 4 and a burst of 40, all arrive in order. Up to WAITING_LIMIT the live
    alerts wait in memory for acks (no read of the durable); beyond it the session falls
    back to its durable, which holds the rest."""
    from tocsin.gateway import session as session_module

    monkeypatch.setattr(session_module, "WAITING_LIMIT", waiting_limit)
    drains = []
    real_drain = session_module.Session._drain

    async def counted(self: session_module.Session, reader: object, pending: int | None) -> None:
        drains.append(self.consumer)
        await real_drain(self, reader, pending)

    monkeypatch.setattr(session_module.Session, "_drain", counted)
    running = await start_gateway(make_settings(max_inflight=4))
    try:
        client = await Client.connect(running.ws_url, token("lee"))
        await client.next("connection_established")
        await eventually(lambda: len(drains) == 1, what="the first (empty) backlog read")
        seqs = [(await append(js, names, alert())).seq for _ in range(40)]
        got: list[int] = []
        while len(got) < 40:
            frame = await client.next("alert")
            if frame["seq"] in got:
                continue  # a redelivery of something not yet acked
            got.append(frame["seq"])
            await client.send({"type": "ack", "seq": frame["seq"]})
        assert got == seqs
        if waiting_limit > 40:
            assert len(drains) == 1  # the burst never touched the durable
        else:
            assert len(drains) > 1  # it fell behind and read the durable
        await client.close()
    finally:
        await running.stop()


async def test_auto_ack_backlog_longer_than_the_window_drains_and_is_saved(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """ack_mode=auto with 30 queued and a window of 8: all arrive, and all count as acked."""
    running = await start_gateway(make_settings(max_inflight=8))
    try:
        tok = token("auto")
        await Client.introduce(running.ws_url, tok, ack_mode="auto")
        seqs = [(await append(js, names, alert())).seq for _ in range(30)]
        back = await Client.connect(running.ws_url, tok, ack_mode="auto")
        assert (await back.next("connection_established"))["pending"] == 30
        assert [f["seq"] for f in await back.alerts(30)] == seqs
        await back.close()
        again = await Client.connect(running.ws_url, tok, ack_mode="auto")
        assert (await again.next("connection_established"))["pending"] == 0
        await again.close()
    finally:
        await running.stop()


@pytest.mark.slow
async def test_a_live_device_keeps_its_queue_past_the_inactivity_threshold(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """JetStream reaps consumers idle for inactive_threshold (= retention); a device that
    stays connected and live must keep its queue, so that a later disconnect loses nothing."""
    running = await start_gateway(make_settings(retention_hours=0.0005))  # 1.8 s
    try:
        tok = token("uma")
        client = await Client.connect(running.ws_url, tok)
        await client.next("connection_established")
        consumer = names.device_consumer("uma", "phone")
        begun = time.monotonic()
        await eventually(
            lambda: time.monotonic() - begun > 3 * 1.8,
            timeout=10,
            what="three inactivity thresholds to pass",
        )
        info = await js.consumer_info(names.alerts_stream, consumer)  # raises if reaped
        assert info.config.inactive_threshold == pytest.approx(1.8)
        await client.close()
    finally:
        await running.stop()


async def test_queue_settings_follow_the_gateway_at_the_next_connect(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """An operator changes TOCSIN_MAX_INFLIGHT, TOCSIN_MAX_DELIVER or the backoff: existing
    device queues take them when the device next connects, keeping their position."""
    tok = token("lou")
    consumer = names.device_consumer("lou", "phone")
    old = await start_gateway(make_settings(max_inflight=8, max_deliver=10))
    try:
        await Client.introduce(old.ws_url, tok)
    finally:
        await old.stop()
    body = alert()
    seq = (await append(js, names, body)).seq
    new = await start_gateway(
        make_settings(max_inflight=16, max_deliver=20, redelivery_backoff=[2, 4])
    )
    try:
        back = await Client.connect(new.ws_url, tok)
        assert (await back.next("connection_established"))["pending"] == 1
        assert [f["seq"] for f in await back.alerts(1, ack=True)] == [seq]
        info = await js.consumer_info(names.alerts_stream, consumer)
        assert info.config.max_ack_pending == 16 and info.config.max_deliver == 20
        assert info.config.backoff == [2.0, 4.0]
        await back.close()
    finally:
        await new.stop()
