"""A nats-server restart (file storage) under a connected gateway: nothing lost."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tocsin.core.embedded import NatsServer
from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import (
    Client,
    RunningGateway,
    alert,
    append,
    eventually,
    handshake,
    run_tocsin,
    start_gateway,
    token,
)


@dataclass
class OwnNats:
    """A nats-server of this test's own (so it can be restarted), a gateway and a client."""

    server: NatsServer
    gateway: RunningGateway
    nc: NatsClient
    js: JetStreamContext


@pytest.fixture
async def own(make_settings: Callable[..., Settings], tmp_path: Path) -> AsyncIterator[OwnNats]:
    server = NatsServer(store_dir=tmp_path / "own-nats").start()
    running = await start_gateway(make_settings(nats_url=[server.url]))
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield OwnNats(server, running, nc, nc.jetstream())
    finally:
        await nc.close()
        await running.stop()
        server.stop()


@pytest.mark.slow
async def test_gateway_survives_nats_restart_without_losing_alerts(
    own: OwnNats, names: Names
) -> None:
    server, running, nc, js = own.server, own.gateway, own.nc, own.js
    client = await Client.connect(running.ws_url, token("quinn"))
    await client.next("connection_established")
    before = await append(js, names, alert())
    assert (await client.alerts(1, ack=True))[0]["seq"] == before.seq

    server.stop()
    server.start()

    async def ready() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{running.http}/readyz") as r:
            return r.status == 200

    await eventually(ready, timeout=20, what="the gateway to reconnect")
    await eventually(lambda: nc.is_connected, timeout=20, what="the test's reconnect")
    after = [(await append(js, names, alert())).seq for _ in range(3)]
    frames = await client.alerts(3, ack=True, timeout=20)
    assert [f["seq"] for f in frames] == after
    await client.close()


@pytest.mark.slow
async def test_handshake_while_nats_is_down_closes_with_4503_and_keeps_the_position(
    own: OwnNats, names: Names
) -> None:
    server, running, nc, js = own.server, own.gateway, own.nc, own.js
    tok = token("rosa")
    client = await Client.connect(running.ws_url, tok)
    await client.next("connection_established")
    acked = await append(js, names, alert())
    await client.alerts(1, ack=True)
    await client.close()
    # The close frame comes back at once (aiohttp answers it); the position is saved just
    # after. NATS must not stop in between, or the ack is lost with it (redelivered later).
    await eventually(lambda: not list(running.gw.sessions), what="the session saved and gone")
    server.stop()
    refused = await Client.connect(running.ws_url, tok)
    assert await refused.wait_closed(timeout=30) == 4503
    await refused.close()
    server.start()
    await eventually(lambda: nc.is_connected, timeout=20, what="the test's reconnect")
    later = await append(js, names, alert())

    async def back_in() -> bool:
        probe = await Client.connect(running.ws_url, tok)
        try:
            hello = await probe.next(timeout=5)
        except (AssertionError, TimeoutError):
            return False
        finally:
            await probe.close()
        kind: str = hello["type"]
        return kind == "connection_established"

    await eventually(back_in, timeout=20, what="the gateway to serve again")
    again = await Client.connect(running.ws_url, tok)
    hello = await again.next("connection_established")
    frames = await again.alerts(hello["pending"], ack=True)
    assert [f["seq"] for f in frames] == [later.seq]  # nothing rewound, nothing lost
    assert acked.seq < later.seq
    await again.close()


@pytest.mark.slow
async def test_a_connection_that_ends_while_nats_is_down_saves_what_it_sent_once_back(
    own: OwnNats, names: Names
) -> None:
    """Its record is written after the reconnect: the next connection gets the unacked
    alerts flagged ``redelivered`` (they were sent), not as new ones."""
    server, running, js = own.server, own.gateway, own.js
    tok = token("sami")
    client = await Client.connect(running.ws_url, tok)
    await client.next("connection_established")
    sent = [(await append(js, names, alert())).seq for _ in range(2)]
    frames = await client.alerts(2)  # not acked
    assert [(f["seq"], f["redelivered"]) for f in frames] == [(s, False) for s in sent]

    async def ready(expected: int) -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"{running.http}/readyz") as r:
            return r.status == expected

    server.stop()
    await eventually(lambda: ready(503), timeout=20, what="the gateway to see NATS gone")
    await client.close()  # the session ends while its gateway is off NATS
    server.start()
    await eventually(lambda: ready(200), timeout=20, what="the gateway to reconnect")
    again = await Client.connect(running.ws_url, tok)
    hello = await again.next("connection_established", timeout=20)
    assert hello["pending"] == 2
    frames = await again.alerts(2, ack=True)
    assert [(f["seq"], f["redelivered"]) for f in frames] == [(s, True) for s in sent]
    await again.close()


@pytest.mark.slow
async def test_a_ban_after_a_nats_restart_still_closes_the_users_sockets(own: OwnNats) -> None:
    """The gateway watches the GUARD bucket for bans; after NATS restarts it watches anew
    (its watchers' consumers have no heartbeat to notice the restart by), so a ban made
    then still closes the user's socket (1008) and refuses its handshakes (429)."""
    server, running = own.server, own.gateway
    tok = token("after-restart", ("KE",))
    client = await Client.connect(running.ws_url, tok)
    await client.next("connection_established")
    server.stop()
    server.start()
    await eventually(lambda: running.gw.nc.is_connected, timeout=20, what="the gateway back")
    code, _, err = await run_tocsin(running.settings, "ban", "add", "after-restart")
    assert code == 0, err
    assert await client.wait_closed(timeout=20) == 1008
    status, body, _ = await handshake(running.ws_url, auth_token=tok)
    assert status == 429 and body["error"] == "banned"
    await client.session.close()
