"""What a reconnect asks of JetStream, counted on the real nats-server (docs/architecture.md
§6, §9): a subscriber in the same account sees a copy of every ``$JS.API`` request and of
every record write (a plain publish on the device's ``DEVICES`` subject).

Each test pins a call a reconnect no longer makes where the device's position is known:
the consumer reset at open when the queue already stands at its floor, the save at close
when nothing moved the floor since JetStream confirmed it, the second record read of a
claim whose owner's gateway is gone. And the one it must still make: the reset at open
when the queue holds deliveries that were never acked.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import nats
import pytest
from nats.aio.client import Client as Nats
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.gateway.session import Session

from ..support import Client, RunningGateway, alert, append, eventually, token

CLIENT_ID = "phone"


@dataclass
class Calls:
    """JetStream API requests and record writes of one namespace, by kind."""

    names: Names
    counts: Counter[str] = field(default_factory=Counter)

    def kind(self, subject: str) -> str | None:
        n = self.names
        if subject.startswith(n.device_record_subject("")):
            return "record write"
        parts = subject.split(".")
        if n.alerts_stream not in parts and n.devices_stream not in parts:
            return None  # another test's streams, or no stream at all
        api = parts[2:]
        if api[:2] == ["STREAM", "MSG"] or api[:2] == ["CONSUMER", "MSG"]:
            return ".".join(api[:3])
        return ".".join(api[:2])

    async def seen(self, msg: Any) -> None:
        kind = self.kind(msg.subject)
        if kind is not None:
            self.counts[kind] += 1

    def record_reads(self) -> int:
        return self.counts["STREAM.MSG.GET"] + self.counts["DIRECT.GET"]


@pytest.fixture
async def calls(nats_url: str, names: Names) -> AsyncIterator[Calls]:
    watcher = await nats.connect(nats_url)
    counting = Calls(names)
    await watcher.subscribe("$JS.API.>", cb=counting.seen)
    await watcher.subscribe(names.devices_all, cb=counting.seen)
    await watcher.flush()
    try:
        yield counting
    finally:
        await watcher.close()


async def settled(calls: Calls, nc: Nats) -> Counter[str]:
    """The counts once the watcher has seen everything sent before now: a request of ours
    round-trips after every message the server took before it."""
    await nc.flush()
    before = -1
    while before != sum(calls.counts.values()):  # nothing new arrives any more
        before = sum(calls.counts.values())
        await nc.request("$JS.API.INFO", b"", timeout=5)
        await asyncio.sleep(0.05)
    return Counter(calls.counts)


async def released(running: RunningGateway, names: Names, user: str) -> None:
    """Wait until the device's session let it go (asked of the gateway, not of JetStream:
    a read of the record would count)."""
    await eventually(lambda: not running.gw.owners.holders, what=f"{user}'s session let go")


async def visit(running: RunningGateway, tok: str, backlog: int = 0) -> dict[str, Any]:
    """Connect, take and ack ``backlog`` alerts, close; the connection_established frame."""
    client = await Client.connect(running.ws_url, tok, client_id=CLIENT_ID)
    hello = await client.next("connection_established")
    await client.alerts(backlog, ack=True)
    await client.close()
    return hello


async def test_a_reconnect_after_a_clean_close_makes_no_reset_and_no_second_save(
    gateway: RunningGateway, calls: Calls, nc: Nats, names: Names
) -> None:
    tok = token("quiet")
    await visit(gateway, tok)  # a new device: its queue starts at the live edge
    await released(gateway, names, "quiet")
    before = await settled(calls, nc)

    hello = await visit(gateway, tok)
    await released(gateway, names, "quiet")
    seen = await settled(calls, nc) - before

    assert hello["pending"] == 0
    # The claim reads the record and writes it; the open reads the queue; the close writes
    # the record without owner. The queue stood at its floor, and stayed there: no reset at
    # open, none at close, no read.
    assert seen == {"STREAM.MSG.GET": 1, "record write": 2, "CONSUMER.INFO": 1}


async def test_a_reconnect_with_a_backlog_resets_only_to_save_what_was_acked(
    gateway: RunningGateway, calls: Calls, nc: Nats, js: JetStreamContext, names: Names
) -> None:
    tok = token("busy")
    await visit(gateway, tok)
    await released(gateway, names, "busy")
    for _ in range(2):
        await append(js, names, alert("KE-30"))
    before = await settled(calls, nc)

    hello = await visit(gateway, tok, backlog=2)
    await released(gateway, names, "busy")
    seen = await settled(calls, nc) - before

    assert hello["pending"] == 2  # as CONSUMER.INFO counted them: no reset asked
    # One read of the backlog, and one reset: the save of what the device acked (at the
    # checkpoint or at close, whichever came first).
    assert seen == {
        "STREAM.MSG.GET": 1,
        "record write": 2,
        "CONSUMER.INFO": 1,
        "CONSUMER.MSG.NEXT": 1,
        "CONSUMER.RESET": 1,
    }


async def test_a_queue_with_unacked_deliveries_is_reset_at_open(
    gateway: RunningGateway, calls: Calls, nc: Nats, js: JetStreamContext, names: Names
) -> None:
    tok = token("crashed")
    await visit(gateway, tok)
    await released(gateway, names, "crashed")
    for _ in range(2):
        await append(js, names, alert("KE-30"))
    # Another reader took both and never acked them, as a gateway killed mid-catchup does.
    consumer = names.device_consumer("crashed", CLIENT_ID)
    reader = await js.pull_subscribe_bind(durable=consumer, stream=names.alerts_stream)
    assert len(await reader.fetch(2, timeout=5)) == 2
    await reader.unsubscribe()
    before = await settled(calls, nc)

    client = await Client.connect(gateway.ws_url, tok, client_id=CLIENT_ID)
    hello = await client.next("connection_established")
    frames = await client.alerts(2, ack=True)
    await client.close()
    await released(gateway, names, "crashed")
    seen = await settled(calls, nc) - before

    # Only a reset puts what was delivered and not acked back in the backlog at once.
    assert hello["pending"] == 2
    assert len({f["seq"] for f in frames}) == 2
    assert seen["CONSUMER.RESET"] == 2  # at open, and the save of the acks


async def test_a_claim_after_the_owners_gateway_vanished_reads_the_record_once(
    gateway: RunningGateway, calls: Calls, nc: Nats, names: Names
) -> None:
    tok = token("orphan")
    await visit(gateway, tok)
    await released(gateway, names, "orphan")
    # The record names a session of a gateway that is gone (killed: nobody answers its
    # takeover subject), as after a SIGKILL.
    records = gateway.gw.owners.records
    consumer = names.device_consumer("orphan", CLIENT_ID)
    seq, record = await records.read(consumer)
    assert record is not None
    await records.write(consumer, record.owned_by("ghost", "vanished"), seq)
    before = await settled(calls, nc)

    await visit(gateway, tok)
    await released(gateway, names, "orphan")
    seen = await settled(calls, nc) - before

    # Read, ask (no responders), claim on the seq read: no second read of the record; one
    # read of the vanished gateway's positions journal (what the device acked since its
    # queue last heard: gateway/journal.py).
    assert calls.record_reads() - (before["STREAM.MSG.GET"] + before["DIRECT.GET"]) == 2
    assert seen["record write"] == 2  # the claim and the release
    assert (await records.recorded(consumer) or {}).get("owner") is None


async def test_a_handshake_abandoned_while_waiting_its_turn_claims_nothing(
    gateway: RunningGateway, calls: Calls, nc: Nats, names: Names
) -> None:
    opening = gateway.gw.owners.opening
    taken = 0
    while not opening.locked():  # every place taken, as by a storm of other devices
        await opening.acquire()
        taken += 1
    try:
        before = await settled(calls, nc)
        client = await Client.connect(gateway.ws_url, token("gaveup"), client_id=CLIENT_ID)
        await eventually(lambda: bool(gateway.gw.owners.holders), what="the session waits")
        await client.close()  # the client gives up before connection_established
        waiting = [s for s in gateway.gw.owners.holders.values() if isinstance(s, Session)]
        await eventually(
            lambda: all(s.transport is None or s.transport.is_closing() for s in waiting),
            what="the gateway saw the client leave",
        )
    finally:
        for _ in range(taken):
            opening.release()
    await released(gateway, names, "gaveup")
    seen = await settled(calls, nc) - before

    assert not client.established
    assert seen == {}  # no record read, no claim, no queue created
    consumer = names.device_consumer("gaveup", CLIENT_ID)
    assert await gateway.gw.owners.records.recorded(consumer) is None


async def test_a_new_device_creates_its_queue_with_one_request(
    gateway: RunningGateway, calls: Calls, nc: Nats, names: Names
) -> None:
    before = await settled(calls, nc)
    hello = await visit(gateway, token("newcomer"))
    await released(gateway, names, "newcomer")
    seen = await settled(calls, nc) - before

    assert hello["pending"] == 0
    # The claim's read and write, the create (no CONSUMER.INFO first, no STREAM.INFO for
    # the last seq: it is the live feed's), the new device's position and the release.
    assert seen == {"STREAM.MSG.GET": 1, "record write": 3, "CONSUMER.CREATE": 1}
