"""A device whose R1 queue is on a node back from a restart gets what was stored meanwhile.

A node that comes back answers for the queues it holds before its copy of the R3 ``ALERTS``
stream has caught up with the alerts stored while it was down (measured on 2.15: about a
second after it accepts clients it answers with ``num_pending`` 0 and empty fetches, then
the missing alerts arrive over a few seconds, each fetch ending with ``num_pending`` 0 at
what has arrived so far). A device that connects in that window must still get every one
of them, before the live alerts that follow (docs/reliability.md, "A queue node back from a
restart").
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest

from tocsin.core.embedded import NatsServer

from ..support import Client, alert, eventually, token
from .conftest import Stack, append_until_acked, host_of

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(240)]

#: Alerts stored while the queue's node is down, ~30 KB each (a 4-byte character 7,400 times,
#: within the 8,000-character message limit): ~45 MB for the node to catch up, which takes
#: it 1-3 s after it answers for its queues (measured), long enough for a reconnect to land in.
MISSED = 3000
LARGE_MESSAGE = "\U0001f99f" * 7400
#: Appends in flight at once while the node is down (the load's pace, bounded).
CONCURRENCY = 32


def stored_last_seq(node: NatsServer, stream: str) -> int | None:
    """The last sequence of ``stream`` in ``node``'s own store (its /jsz), not the leader's."""
    url = f"http://{node.host}:{node.monitor_port}/jsz?accounts=true&streams=true"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as resp:
            body: dict[str, Any] = json.loads(resp.read())
    except OSError:
        return None
    for account in body.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail["name"] == stream:
                return int(detail["state"]["last_seq"])
    return None


async def test_a_reconnect_to_a_queue_node_still_catching_up_loses_nothing(stack: Stack) -> None:
    names, js = stack.names, stack.js
    stream = names.alerts_stream
    tok = token("ola", regions=("KE",))
    consumer = names.device_consumer("ola", "phone")

    first = await Client.connect(stack.gateway.ws_url, tok)
    await first.next("connection_established")
    seen = (await append_until_acked(js, names, alert("KE-30"))).seq
    assert [f["seq"] for f in await first.alerts(1, ack=True)] == [seen]
    await first.close()  # clean close: the queue's floor and the record are at ``seen``

    async def recorded_floor() -> bool:
        record = await stack.gateway.gw.records.recorded(consumer)
        return record is not None and record["floor"] == seen

    await eventually(recorded_floor, timeout=10, what="the record at close")
    x = await host_of(stack, consumer)
    stack.cluster.kill(x)

    # While the queue's node is down the R3 stream takes alerts on the other two.
    bodies = [alert("KE-30", message=LARGE_MESSAGE) for _ in range(MISSED)]
    missed: list[int] = []
    for start in range(0, MISSED, CONCURRENCY):
        chunk = bodies[start : start + CONCURRENCY]
        acks = await asyncio.gather(*(append_until_acked(js, names, b) for b in chunk))
        missed += [a.seq for a in acks]
    missed.sort()  # stored in that order, whatever order the PubAcks came in
    # The gateway's live feed is past them all: a session registered from here is offered
    # none of them live, only its queue can give them (with the feed behind, the buffer
    # would hold them, or hold more than the window and keep the session reading).
    await eventually(
        lambda: stack.gateway.gw.feed.last_seq >= missed[-1], timeout=60, what="the live feed"
    )

    # The node comes back on its store; once it answers for the queue (not before: a queue
    # that does not answer is rebuilt elsewhere, a different path), the device reconnects.
    stack.cluster.start_node(x)

    async def answers_from_x() -> bool:
        try:  # a short timeout: the window is a second or two
            info = await js.consumer_info(stream, consumer, timeout=0.25)
        except Exception:  # not loaded yet: a request timeout
            return False
        return info.cluster is not None and info.cluster.leader == stack.cluster.nodes[x].name

    await eventually(answers_from_x, timeout=60, what="the queue's node answering for it")
    behind = stored_last_seq(stack.cluster.nodes[x], stream)
    again = await Client.connect(stack.gateway.ws_url, tok)
    hello = await again.next("connection_established", timeout=60)
    held = f"{behind} of {missed[-1]}, pending {hello['pending']}"
    print(f"\nthe queue's node held {held}; rebuilt {stack.gateway.gw.queues.rebuilt}")

    # A live alert after all of them: it must come last, after every missed one.
    marker = (await append_until_acked(js, names, alert("KE-30"))).seq
    got: list[int] = []
    while not got or got[-1] < marker:
        frame = await again.next("alert", timeout=60)
        got.append(frame["seq"])
        await again.send({"type": "ack", "seq": frame["seq"]})
    lost = sorted(set(missed) - set(got))
    assert not lost, f"{len(lost)} of {len(missed)} never delivered (first {lost[:3]})"
    assert got == [*missed, marker]
    await again.close()
