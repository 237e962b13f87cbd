"""Supersede on a 3-node cluster (ALERT_INDEX at R3 like ALERTS): the index's leader node
is killed and a new gateway starts; it rebuilds the superseded ids from the remaining
replicas, and a device offline through an alert and its cancel receives only the cancel."""

from __future__ import annotations

import aiohttp

from tocsin.gateway.local import start_local_gateway

from ..cap.test_mapping import fixture, mapped
from ..support import DEADLINE, Client, eventually, token
from .conftest import Stack

KENYA = token("wanjiru", ("KE",), roles=("health_worker",))
PUBLISHER = token("engine", ("KE",), roles=("publisher",))


async def test_superseded_index_survives_its_leaders_loss(stack: Stack) -> None:
    gateway = stack.gateway
    await Client.introduce(gateway.ws_url, KENYA)
    headers = {"Content-Type": "application/cap+xml", "Authorization": f"Bearer {PUBLISHER}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http:
        for name in ("health_cholera.xml", "health_cholera_cancel.xml"):
            async with http.post(
                f"{gateway.http}/api/v1/alerts", data=fixture(name), headers=headers
            ) as resp:
                assert resp.status == 202, await resp.text()
    info = await stack.js.stream_info(stack.names.index_stream)
    assert info.config.num_replicas == 3 and info.cluster is not None and info.cluster.leader
    dead = [n.name for n in stack.cluster.nodes].index(info.cluster.leader)
    stack.cluster.kill(dead)

    fresh = await start_local_gateway(gateway.settings)  # reads the index from the others
    try:
        assert len(fresh.gw.supersessions) == 2
        await eventually(lambda: fresh.gw.nc.is_connected, what="the new gateway on NATS")
        client = await Client.connect(fresh.ws_url, KENYA)
        await client.next("connection_established", timeout=60)
        first, _ = mapped("health_cholera.xml")
        cancel, _ = mapped("health_cholera_cancel.xml")
        skipped = await client.next("backlog_superseded", timeout=30)
        assert skipped["alert_id"] == first.alert_id
        got = await client.alerts(1, ack=True, timeout=30)
        assert [f["alert"]["alert_id"] for f in got] == [cancel.alert_id]
        await client.nothing_more(0.5)
        await client.close()
    finally:
        await fresh.stop()
