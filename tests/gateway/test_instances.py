"""Several gateway instances and processes: devices, takeover, shutdown, crashes."""

from __future__ import annotations

import signal
from collections.abc import Callable

from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.journal import Journal
from tocsin.gateway.records import DeviceRecords

from ..support import Client, GatewayProcess, alert, append, eventually, start_gateway, token


async def test_two_gateway_processes_serve_one_users_two_devices(
    settings: Settings,
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    one, two = gateway_process(settings), gateway_process(settings)
    tok = token("maria", ("KE",))
    phone = await Client.connect(one.ws_url, tok, client_id="phone")
    tablet = await Client.connect(two.ws_url, tok, client_id="tablet")
    await phone.next("connection_established")
    await tablet.next("connection_established")
    seqs = [(await append(js, names, alert())).seq for _ in range(3)]
    assert [f["seq"] for f in await phone.alerts(3, ack=True)] == seqs
    assert [f["seq"] for f in await tablet.alerts(3)] == seqs  # the tablet never acks
    await phone.close()
    await tablet.close()
    # each device has its own queue: the tablet's three come back, the phone's do not
    tablet_again = await Client.connect(one.ws_url, tok, client_id="tablet")
    phone_again = await Client.connect(two.ws_url, tok, client_id="phone")
    assert (await tablet_again.next("connection_established"))["pending"] == 3
    assert (await phone_again.next("connection_established"))["pending"] == 0
    assert [f["seq"] for f in await tablet_again.alerts(3, ack=True)] == seqs
    await tablet_again.close()
    await phone_again.close()


async def test_same_device_connecting_elsewhere_replaces_the_old_connection(
    settings: Settings, js: JetStreamContext, names: Names
) -> None:
    a, b = await start_gateway(settings), await start_gateway(settings)
    try:
        tok = token("nora")
        old = await Client.connect(a.ws_url, tok)
        await old.next("connection_established")
        first = await append(js, names, alert())
        assert (await old.alerts(1, ack=True))[0]["seq"] == first.seq
        new = await Client.connect(b.ws_url, tok)
        assert await old.wait_closed() == 4009
        hello = await new.next("connection_established")
        assert hello["pending"] == 0  # the old connection's ack was saved before it left
        second = await append(js, names, alert())
        assert (await new.alerts(1))[0]["seq"] == second.seq
        await new.close()
    finally:
        await a.stop()
        await b.stop()


async def test_sigterm_closes_sockets_with_1001_and_keeps_unacked_alerts(
    settings: Settings,
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    proc = gateway_process(settings)
    tok = token("olga")
    client = await Client.connect(proc.ws_url, tok)
    await client.next("connection_established")
    seqs = [(await append(js, names, alert())).seq for _ in range(4)]
    frames = await client.alerts(4)
    await client.send({"type": "ack", "seq": frames[1]["seq"]})
    await client.send({"type": "get_stats"})
    await client.next("connection_stats")  # the ack has been processed
    assert proc.stop(signal.SIGTERM) == 0
    assert await client.wait_closed() == 1001
    await client.close()
    other = gateway_process(settings)
    back = await Client.connect(other.ws_url, tok)
    assert (await back.next("connection_established"))["pending"] == 2
    again = await back.alerts(2, ack=True)
    assert [f["seq"] for f in again] == seqs[2:] and all(f["redelivered"] for f in again)
    await back.close()


async def test_gateway_killed_mid_stream_loses_nothing(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    settings = make_settings(checkpoint_seconds=0.2)
    proc = gateway_process(settings)
    tok = token("pia")
    client = await Client.connect(proc.ws_url, tok)
    await client.next("connection_established")
    seqs = [(await append(js, names, alert())).seq for _ in range(10)]
    got = await client.alerts(5, ack=True)
    proc.stop(signal.SIGKILL)
    await client.wait_closed()
    await client.close()
    seqs += [(await append(js, names, alert())).seq for _ in range(3)]
    other = gateway_process(settings)
    back = await Client.connect(other.ws_url, tok)
    await back.next("connection_established")
    delivered = [f["seq"] for f in got]
    while not delivered or delivered[-1] != seqs[-1]:
        frame = await back.next("alert")
        if frame["seq"] not in delivered:  # a crash may repeat what was acked since the
            delivered.append(frame["seq"])  # last checkpoint: clients drop it by alert_id
        await back.send({"type": "ack", "seq": frame["seq"]})
    assert delivered == seqs
    await back.close()


async def test_a_killed_gateways_devices_resume_from_its_positions_journal(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    """A live device's queue is not told of its acks while connected (its reset is an hour
    away here): the gateway's positions journal is, every checkpoint interval. After a
    kill -9 the device's next connection starts from the journal: nothing it acked before
    the journal was written comes again, and nothing after is skipped."""
    settings = make_settings(checkpoint_seconds=0.2, queue_save_seconds=3600)
    proc = gateway_process(settings)
    tok = token("jo")
    client = await Client.connect(proc.ws_url, tok)
    await client.next("connection_established")
    acked = [(await append(js, names, alert())).seq for _ in range(5)]
    assert [f["seq"] for f in await client.alerts(5, ack=True)] == acked
    consumer = names.device_consumer("jo", "phone")
    journal = Journal(js, names, "reader")

    async def journaled() -> bool:
        gateway = ((await DeviceRecords(js, names).recorded(consumer)) or {}).get("gateway")
        at = await journal.read(str(gateway), consumer) if gateway else None
        return at is not None and at.floor == acked[-1] and at.sent == acked[-1]

    await eventually(journaled, what="the acks in the positions journal")
    info = await js.consumer_info(names.alerts_stream, consumer)
    assert info.ack_floor is None or info.ack_floor.stream_seq < acked[0]  # the queue: not
    proc.stop(signal.SIGKILL)
    await client.wait_closed()
    await client.close()
    later = [(await append(js, names, alert())).seq for _ in range(2)]
    back = await Client.connect(gateway_process(settings).ws_url, tok)
    hello = await back.next("connection_established")
    assert hello["pending"] == 2
    assert [f["seq"] for f in await back.alerts(2, ack=True)] == later
    await back.nothing_more(0.5)
    await back.close()
