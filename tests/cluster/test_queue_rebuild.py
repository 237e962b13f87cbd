"""An R1 device queue whose node dies is rebuilt from the device's record and the R3 stream.

Device queues are R1 (docs/operations.md: R3 costs 4-40x per consumer and caps a cluster at
about 2,000 devices). When a queue's node is down its device cannot be served from it; the
gateway then rebuilds the queue on a live node from the device's record in ``DEVICES`` (its
acked floor and subscription) and the alerts in the replicated ``ALERTS`` stream.
"""

from __future__ import annotations

import asyncio

import pytest

from ..gateway.test_metrics import scrape, value
from ..support import Client, alert, eventually, token
from .conftest import Stack, append_until_acked, host_of

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(180)]


async def test_a_queue_on_a_dead_node_is_rebuilt_from_the_record(stack: Stack) -> None:
    names, js = stack.names, stack.js
    tok = token("nia", regions=("KE",))
    consumer = names.device_consumer("nia", "phone")

    first = await Client.connect(stack.gateway.ws_url, tok)
    await first.next("connection_established")
    await first.send({"type": "subscribe", "groups": ["region:KE-30"]})
    assert (await first.next("subscription_response"))["status"] == "ok"
    seen = [(await append_until_acked(js, names, alert("KE-30"))).seq for _ in range(3)]
    got = await first.alerts(3, ack=True)
    assert [f["seq"] for f in got] == seen
    await first.close()  # clean close: the record holds floor = seen[-1] and the group

    async def recorded_floor() -> bool:
        record = await stack.gateway.gw.records.recorded(consumer)
        return record is not None and record["floor"] == seen[-1]

    await eventually(recorded_floor, timeout=10, what="the record at close")
    dead = await host_of(stack, consumer)
    stack.cluster.kill(dead)

    # While the node is down the R3 stream takes alerts (two replicas of three remain).
    missed = []
    for region in ["KE-30", "KE-31", "KE-30", "KE-30"]:
        body = alert(region)
        ack = await append_until_acked(js, names, body)
        if region == "KE-30":
            missed.append((ack.seq, body["alert_id"]))

    # The gateway itself may have been connected to the dead node: a handshake before it
    # reconnected would be refused with 4503 (a client retries; this one would not).
    await eventually(lambda: stack.gateway.gw.nc.is_connected, what="the gateway on NATS")
    again = await Client.connect(stack.gateway.ws_url, tok)
    hello = await again.next("connection_established", timeout=60)
    assert hello["groups"] == ["region:KE-30"]  # the subscription came back with it
    assert hello["pending"] == len(missed)
    frames = await again.alerts(len(missed), ack=True)
    assert [(f["seq"], f["alert"]["alert_id"]) for f in frames] == missed  # nothing more
    await again.nothing_more(0.5)
    assert stack.gateway.gw.queues.rebuilt == 1
    families = await scrape(stack.gateway.http)
    assert value(families, "tocsin_gateway_queues_rebuilt_total") == 1
    assert await host_of(stack, consumer) != dead

    # The node returns; the old copy does not: the rebuilt queue keeps its position.
    stack.cluster.start_node(dead)
    await asyncio.to_thread(stack.cluster.wait_healthy, 30)
    later = await append_until_acked(js, names, alert("KE-30"))
    assert (await again.alerts(1, ack=True))[0]["seq"] == later.seq
    await again.close()

    async def settled() -> bool:
        info = await js.consumer_info(names.alerts_stream, consumer)
        return info.ack_floor is not None and info.ack_floor.stream_seq == later.seq

    await eventually(settled, timeout=20, what="the rebuilt queue's floor")
