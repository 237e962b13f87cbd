"""The device's record in DEVICES: what rebuilds a queue that is gone (operations.md §3)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import Client, RunningGateway, alert, append, eventually, token


async def record_floor(gateway: RunningGateway, consumer: str) -> int | None:
    record = await gateway.gw.records.recorded(consumer)
    return None if record is None or record["floor"] is None else int(record["floor"])


async def test_a_queue_gone_with_its_record_kept_comes_back_from_the_record(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """A rebuild cut short after its delete, or a queue deleted by hand: the device is not
    new, so it must not start at the live edge and skip what it has not acked."""
    tok = token("olu")
    consumer = names.device_consumer("olu", "phone")
    first = await Client.connect(gateway.ws_url, tok)
    await first.next("connection_established")
    await first.send({"type": "subscribe", "groups": ["region:KE-30"]})
    assert (await first.next("subscription_response"))["status"] == "ok"
    acked = [(await append(js, names, alert("KE-30"))).seq for _ in range(2)]
    await first.alerts(2, ack=True)
    await first.close()
    await eventually(
        lambda: _is(record_floor(gateway, consumer), acked[-1]), what="the record at close"
    )
    missed = [(await append(js, names, alert("KE-30"))).seq for _ in range(3)]
    await append(js, names, alert("KE-31"))  # outside the recorded group
    await js.delete_consumer(names.alerts_stream, consumer)

    again = await Client.connect(gateway.ws_url, tok)
    hello = await again.next("connection_established")
    assert hello["groups"] == ["region:KE-30"]
    assert hello["pending"] == 3
    assert [f["seq"] for f in await again.alerts(3, ack=True)] == missed
    await again.nothing_more(0.5)
    await again.close()


@pytest.mark.parametrize(
    "stored",
    [b"not json", b"[]", orjson.dumps({"floor": "x"}), orjson.dumps({"floor": 3})],
    ids=["not-json", "not-an-object", "bad-floor", "no-subscription"],
)
async def test_an_unreadable_record_counts_as_none(
    gateway: RunningGateway, js: JetStreamContext, names: Names, stored: bytes
) -> None:
    consumer = names.device_consumer("pia", "phone")
    await js.publish(names.device_record_subject(consumer), stored)
    client = await Client.connect(gateway.ws_url, token("pia"))
    hello = await client.next("connection_established")  # a new device, not an error
    assert hello["pending"] == 0

    async def readable() -> bool:
        return await record_floor(gateway, consumer) is not None

    await eventually(readable, what="the record rewritten, readable")
    await client.close()


async def test_a_connected_device_keeps_its_record_current(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records are rewritten after checkpoints while a device stays connected: a dashboard
    connected for days must not outlive its record (DEVICES keeps records for the
    retention), and a rebuild should repeat little."""
    from tocsin.gateway import session

    from ..support import start_gateway

    monkeypatch.setattr(session, "RECORD_SECONDS", 0.3)
    running = await start_gateway(make_settings(checkpoint_seconds=0.2))
    try:
        consumer = names.device_consumer("quin", "desk")
        client = await Client.connect(running.ws_url, token("quin"), client_id="desk")
        await client.next("connection_established")

        async def recorded() -> bool:  # a new device's position follows the hello
            return await record_floor(running, consumer) is not None

        await eventually(recorded, what="the new device's record")
        connected_floor = await record_floor(running, consumer)
        seqs = [(await append(js, names, alert("KE-30"))).seq for _ in range(3)]
        await client.alerts(3, ack=True)
        await eventually(
            lambda: _is(record_floor(running, consumer), seqs[-1]),
            timeout=10,
            what="the record to follow the acks while connected",
        )
        assert connected_floor is not None and connected_floor < seqs[0]
        await client.close()
    finally:
        await running.stop()


async def _is(floor: Awaitable[int | None], want: int) -> bool:
    return await floor == want


async def test_a_queue_kept_with_its_record_gone_is_opened_as_it_stands(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """No record looks like a new device, whose queue is created outright; a queue of that
    name exists (its record purged by hand, expired first), so the create is refused and
    the queue is opened with its backlog, not replaced at the live edge."""
    tok = token("ines")
    consumer = names.device_consumer("ines", "phone")
    first = await Client.connect(gateway.ws_url, tok)
    await first.next("connection_established")
    await first.close()

    async def released() -> bool:
        record = await gateway.gw.records.recorded(consumer)
        return record is not None and record["floor"] is not None and record["owner"] is None

    await eventually(released, what="the record at close")
    missed = [(await append(js, names, alert("KE-30"))).seq for _ in range(2)]
    await js.purge_stream(names.devices_stream, subject=names.device_record_subject(consumer))

    again = await Client.connect(gateway.ws_url, tok)
    hello = await again.next("connection_established")
    assert hello["pending"] == 2
    assert [f["seq"] for f in await again.alerts(2, ack=True)] == missed
    await again.close()
