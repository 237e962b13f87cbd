"""The Python SDK (clients/python, ``tocsin_client``) against a real gateway and a real
nats-server: delivery, acks, reconnects across a gateway restart and a NATS restart with
nothing lost and nothing handed twice to the application, close codes, Retry-After, token
refresh, the dedupe store's hook, and its exceptions."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from tocsin.core.embedded import NatsServer
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin_client import (
    AuthError,
    Delivery,
    InvalidParameter,
    LimitError,
    MemorySeenStore,
    ProtocolError,
    Replaced,
    SubscriptionRefused,
    TocsinClient,
)

from ..support import (
    DEADLINE,
    GatewayProcess,
    RunningGateway,
    alert,
    append,
    eventually,
    start_gateway,
    token,
)

LONG = 30.0  # bounds a hang across a restart; never a speed claim


class Handler:
    """The application: records every alert it is handed, in order."""

    def __init__(self) -> None:
        self.handled: list[Delivery] = []
        self.task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None

    @property
    def ids(self) -> list[str]:
        return [d.alert_id for d in self.handled]

    def run(self, client: TocsinClient) -> Handler:
        async def consume() -> None:
            try:
                async for delivery in client.alerts():
                    self.handled.append(delivery)
            except BaseException as exc:
                self.error = exc
                raise

        self.task = asyncio.create_task(consume())
        return self

    async def until(self, n: int, timeout: float = DEADLINE) -> None:
        await eventually(
            lambda: len(self.handled) >= n or self.error is not None, timeout, f"{n} alerts handled"
        )
        assert self.error is None, self.error


def ids_of(bodies: list[dict[str, Any]]) -> list[str]:
    return [str(b["alert_id"]) for b in bodies]


async def publish(
    js: JetStreamContext, names: Names, n: int, **fields: Any
) -> list[dict[str, Any]]:
    bodies = [alert("KE-30", **fields) for _ in range(n)]
    for body in bodies:
        await append(js, names, body)
    return bodies


async def test_alerts_are_handed_once_in_order_and_acked(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    async with TocsinClient(gateway.ws_url, token("sdk-a"), client_id="p1") as client:
        hello = await client.connected(DEADLINE)
        assert hello["type"] == "connection_established" and hello["client_id"] == "p1"
        handler = Handler().run(client)
        bodies = await publish(js, names, 5)
        await handler.until(5)
        assert handler.ids == ids_of(bodies)
        assert [d.seq for d in handler.handled] == sorted(d.seq for d in handler.handled)

        # Acks go out once the handler asked for the next alert: all 5 are acked.
        async def acked() -> bool:
            stats = await client.get_stats()
            return bool(stats["acked_seq"] == handler.handled[-1].seq and stats["inflight"] == 0)

        await eventually(acked, what="the acks of the handled alerts")
        stats = await client.get_stats()
        # Coalesced: fewer ack frames than alerts is allowed, never more.
        assert 1 <= stats["acks_received"] <= 5


async def test_resumes_across_gateway_restarts_without_loss_or_duplicates(
    settings: Settings,
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    proc = gateway_process(settings)
    states: list[str] = []
    client = TocsinClient(
        proc.ws_url, token("sdk-b"), client_id="p1", on_state=lambda s, _: states.append(s)
    )
    await client.start()
    try:
        await client.connected(DEADLINE)
        handler = Handler().run(client)
        first = await publish(js, names, 3)
        await handler.until(3)

        proc.stop()  # SIGTERM: 1001, positions saved
        during = await publish(js, names, 3)  # queued for the device meanwhile
        proc.start()
        proc.wait_up(LONG)
        await handler.until(6, LONG)

        proc.kill()  # kill -9: 1006; alerts acked just before may come again, unflagged
        after_kill = await publish(js, names, 3)
        proc.start()
        proc.wait_up(LONG)
        await handler.until(9, LONG)
        last = await publish(js, names, 2)
        await handler.until(11, LONG)

        assert handler.ids == ids_of(first + during + after_kill + last)
        assert client.connections == 3
        assert states.count("waiting") >= 2
    finally:
        await client.close()


@pytest.fixture
async def own_nats(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(store_dir=tmp_path / "own-nats").start()
    yield server
    server.stop()


@pytest.mark.slow
async def test_resumes_across_a_nats_restart_without_loss_or_duplicates(
    own_nats: NatsServer, make_settings: Callable[..., Settings], names: Names
) -> None:
    from tocsin.core.topology import apply_topology

    settings = make_settings(nats_url=[own_nats.url])
    nc = await nats.connect(own_nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await apply_topology(js, settings, names)
    running = await start_gateway(settings)
    client = TocsinClient(running.ws_url, token("sdk-c"), client_id="p1")
    await client.start()
    try:
        await client.connected(DEADLINE)
        handler = Handler().run(client)
        before = await publish(js, names, 3)
        await handler.until(3)

        own_nats.stop()
        own_nats.start()
        await eventually(lambda: nc.is_connected, LONG, "the test's NATS reconnect")

        async def appended() -> list[dict[str, Any]] | None:
            try:
                return await publish(js, names, 3)
            except Exception:
                return None

        after: list[dict[str, Any]] = []

        async def published() -> bool:
            nonlocal after
            after = await appended() or []
            return bool(after)

        await eventually(published, LONG, "JetStream to take alerts again")
        await handler.until(6, LONG)
        assert handler.ids == ids_of(before + after)
    finally:
        await client.close()
        await running.stop()
        await nc.close()


async def test_a_handler_busy_across_a_reconnect_gets_the_redelivered_alert_once(
    settings: Settings,
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    proc = gateway_process(settings)
    async with TocsinClient(proc.ws_url, token("sdk-d"), client_id="p1") as client:
        await client.connected(DEADLINE)
        alerts = client.alerts()
        [x] = await publish(js, names, 1)
        got = await asyncio.wait_for(anext(alerts), DEADLINE)  # handling x: not acked yet
        assert got.alert_id == str(x["alert_id"])

        proc.stop()
        proc.start()
        proc.wait_up(LONG)
        await eventually(lambda: client.connections == 2, LONG, "the reconnect")

        async def x_again() -> bool:  # x came again on the new connection
            return bool((await client.get_stats())["alerts_redelivered"] == 1)

        await eventually(x_again, what="x redelivered")

        [y] = await publish(js, names, 1)
        nxt = await asyncio.wait_for(anext(alerts), DEADLINE)  # x is done now
        assert nxt.alert_id == str(y["alert_id"])  # its redelivered copy was skipped
        await client.ack(nxt)

        async def all_acked() -> bool:
            return bool((await client.get_stats())["inflight"] == 0)

        await eventually(all_acked, what="x's redelivery and y acked")


async def test_4009_is_not_retried(gateway: RunningGateway) -> None:
    first = TocsinClient(gateway.ws_url, token("sdk-e"), client_id="same")
    second = TocsinClient(gateway.ws_url, token("sdk-e"), client_id="same")
    await first.start()
    try:
        await first.connected(DEADLINE)
        alerts = first.alerts()
        await second.start()
        await second.connected(DEADLINE)
        with pytest.raises(Replaced):
            await asyncio.wait_for(anext(alerts), DEADLINE)
        assert first.state == "closed" and isinstance(first.failure, Replaced)
        assert first.connections == 1
        with pytest.raises(Replaced):
            await first.connected(1)
    finally:
        await first.close()
        await second.close()


async def test_429_waits_for_retry_after_then_connects(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    running = await start_gateway(make_settings(max_connections_per_user=1))
    waits: list[float] = []
    holder = TocsinClient(running.ws_url, token("sdk-f"), client_id="one")

    def state(now: str, _: str) -> None:
        if now == "waiting" and other.last_delay is not None:
            waits.append(other.last_delay)

    other = TocsinClient(running.ws_url, token("sdk-f"), client_id="two", on_state=state)
    try:
        await holder.start()
        await holder.connected(DEADLINE)
        started = time.monotonic()
        await other.start()
        await eventually(lambda: bool(waits), what="the refused handshake")
        # Retry-After: 1 on too_many_connections: the first wait is at least that.
        assert waits[0] >= 1.0, waits
        await holder.close()
        await other.connected(LONG)
        assert time.monotonic() - started >= 1.0
    finally:
        await holder.close()
        await other.close()
        await running.stop()


async def test_a_retry_after_beyond_max_retry_after_is_a_limit_error(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    running = await start_gateway(make_settings(max_connections_per_user=1))
    holder = TocsinClient(running.ws_url, token("sdk-g"), client_id="one")
    other = TocsinClient(running.ws_url, token("sdk-g"), client_id="two", max_retry_after=0.5)
    try:
        await holder.start()
        await holder.connected(DEADLINE)
        await other.start()
        with pytest.raises(LimitError) as caught:
            await other.connected(DEADLINE)
        assert caught.value.status == 429 and caught.value.error == "too_many_connections"
        assert caught.value.retry_after == 1.0
    finally:
        await holder.close()
        await other.close()
        await running.stop()


async def test_a_refused_token_is_an_auth_error_without_retry(gateway: RunningGateway) -> None:
    client = TocsinClient(gateway.ws_url, "not-a-token")
    await client.start()
    try:
        with pytest.raises(AuthError) as caught:
            await client.connected(DEADLINE)
        assert caught.value.status == 401 and caught.value.error == "malformed_token"
        assert caught.value.body["error"] == "malformed_token"
        assert client.connections == 0 and client.state == "closed"
    finally:
        await client.close()


async def test_a_provider_is_asked_again_when_its_token_is_refused(gateway: RunningGateway) -> None:
    tokens = iter(["not-a-token", token("sdk-h")])
    calls: list[float] = []

    def provider() -> str:
        calls.append(time.time())
        return next(tokens)

    async with TocsinClient(gateway.ws_url, provider, client_id="p") as client:
        hello = await client.connected(DEADLINE)
        assert hello["user_id"] == "sdk-h" and len(calls) == 2


async def test_a_failing_token_callable_is_asked_again_later(gateway: RunningGateway) -> None:
    calls = 0

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("identity provider unreachable")
        return token("sdk-q")

    async with TocsinClient(gateway.ws_url, provider, client_id="p") as client:
        assert (await client.connected(DEADLINE))["user_id"] == "sdk-q"
        assert calls == 2


async def test_the_token_is_refreshed_before_exp_without_loss(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    calls: list[str] = []

    async def provider() -> str:
        calls.append(tok := token("sdk-i", ttl=4 + len(calls) * 600))
        return tok

    # The first token lives 4 s; with refresh_before=3 the client switches after ~1 s.
    client = TocsinClient(gateway.ws_url, provider, client_id="p", refresh_before=3)
    async with client:
        await client.connected(DEADLINE)
        handler = Handler().run(client)
        first = await publish(js, names, 2)
        await handler.until(2)
        await eventually(lambda: client.connections == 2, DEADLINE, "the token switch")
        second = await publish(js, names, 2)
        await handler.until(4)
        assert handler.ids == ids_of(first + second)
        assert len(calls) == 2
        assert (await client.connected(1))["user_id"] == "sdk-i"


class SqliteSeen:
    """An application's own seen-ids store (the persistence hook), on SQLite."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, until REAL)")

    async def contains(self, alert_id: str) -> bool:
        row = self.db.execute("SELECT until FROM seen WHERE id = ?", (alert_id,)).fetchone()
        return row is not None and row[0] >= time.time()

    async def add(self, alert_id: str, forget_after: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?)", (alert_id, forget_after))
        self.db.commit()


class DiesAfterStoring(SqliteSeen):
    """The app stores the id, then dies before the client could ack."""

    async def add(self, alert_id: str, forget_after: float) -> None:
        await super().add(alert_id, forget_after)
        raise RuntimeError("the app died")


async def test_dedupe_uses_the_applications_store_across_restarts_of_the_app(
    gateway: RunningGateway, js: JetStreamContext, names: Names, tmp_path: Path
) -> None:
    path = tmp_path / "seen.db"
    device = "p-" + uuid.uuid4().hex[:6]
    # First run of the app: handles x, stores its id and dies before the ack.
    async with TocsinClient(
        gateway.ws_url, token("sdk-j"), client_id=device, seen=DiesAfterStoring(path)
    ) as client:
        await client.connected(DEADLINE)
        handler = Handler().run(client)
        await publish(js, names, 1)
        assert handler.task is not None
        with pytest.raises(RuntimeError, match="the app died"):
            await asyncio.wait_for(handler.task, DEADLINE)
    # Second run: the server sends x again (never acked); the store says it was handled.
    async with TocsinClient(
        gateway.ws_url, token("sdk-j"), client_id=device, seen=SqliteSeen(path)
    ) as client:
        hello = await client.connected(DEADLINE)
        assert hello["pending"] == 1
        handler = Handler().run(client)
        [y] = await publish(js, names, 1)
        await handler.until(1)
        assert handler.ids == [str(y["alert_id"])]

        async def acked() -> bool:
            stats = await client.get_stats()
            return bool(stats["inflight"] == 0 and stats["alerts_redelivered"] == 1)

        await eventually(acked, what="the skipped redelivery of x acked too")


async def test_the_memory_store_is_bounded() -> None:
    store = MemorySeenStore(max_ids=2)
    for i in range(3):
        await store.add(str(i), time.time() + 60)
    assert len(store) == 2 and not await store.contains("0") and await store.contains("2")
    await store.add("old", time.time() - 1)
    assert not await store.contains("old")


async def test_requests_return_the_answer_or_raise_a_clear_error(gateway: RunningGateway) -> None:
    async with TocsinClient(gateway.ws_url, token("sdk-k", ("KE",)), client_id="p") as client:
        response = await client.subscribe(["region:KE-30", "level:critical"])
        assert response["status"] == "ok"
        assert response["subscribed"] == ["level:critical", "region:KE-30"]
        with pytest.raises(SubscriptionRefused) as refused:
            await client.subscribe(["region:UG"])
        assert refused.value.status == "denied" and "region:UG" in refused.value.detail
        with pytest.raises(SubscriptionRefused) as invalid:
            await client.update_filters({"risk_threshold": 2})
        assert invalid.value.status == "invalid" and "risk_threshold" in invalid.value.detail
        with pytest.raises(ProtocolError) as bad_frame:
            await client.subscribe([])  # a frame-level fault: an error frame, not a response
        assert bad_frame.value.code == "invalid_frame" and "groups" in bad_frame.value.detail
        response = await client.update_filters({"location_filter": {"regions": ["KE-30"]}})
        assert response["filters"] == {"location_filter": {"regions": ["KE-30"]}}
        assert (await client.unsubscribe(["level:critical"]))["subscribed"] == ["region:KE-30"]


async def test_a_request_made_before_connecting_is_sent_once_connected(
    gateway: RunningGateway,
) -> None:
    client = TocsinClient(gateway.ws_url, token("sdk-l"), client_id="p")
    await client.start()
    try:
        response = await client.subscribe(["level:high"])  # not connected yet, maybe
        assert response["subscribed"] == ["level:high"]
    finally:
        await client.close()


async def test_bad_parameters_are_an_invalid_parameter_error(gateway: RunningGateway) -> None:
    client = TocsinClient(gateway.ws_url, token("sdk-m"), client_id="not a valid id!")
    await client.start()
    try:
        with pytest.raises(InvalidParameter) as caught:
            await client.connected(DEADLINE)
        assert caught.value.status == 400 and caught.value.detail.startswith("client_id")
    finally:
        await client.close()
    with pytest.raises(ValueError, match="filters"):
        TocsinClient(gateway.ws_url, "t", filters={"risk": 1})


async def test_filters_are_sent_on_the_first_connection_only(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    filters = {
        "risk_threshold": 0.5,
        "alert_types": ["flood"],
        "location_filter": {"regions": ["KE"]},
    }
    async with TocsinClient(gateway.ws_url, token("sdk-n"), client_id="p", filters=filters) as c:
        hello = await c.connected(DEADLINE)
        assert hello["filters"] == {
            "alert_types": ["flood"],
            "location_filter": {"regions": ["KE"]},
            "risk_threshold": 0.5,
        }
        handler = Handler().run(c)
        await publish(js, names, 1, alert_type="outbreak_risk")  # filtered out
        [flood] = await publish(js, names, 1, alert_type="flood")
        await handler.until(1)
        assert handler.ids == [str(flood["alert_id"])]


async def test_no_gateway_is_unreachable_only_when_the_app_sets_a_limit() -> None:
    from tocsin.core.supervisor import free_port
    from tocsin_client import Backoff, Unreachable

    url = f"ws://127.0.0.1:{free_port()}/api/v1/alerts/ws"  # nothing listens
    client = TocsinClient(
        url, token("sdk-o"), max_failed_attempts=3, backoff=Backoff(initial=0.01, maximum=0.02)
    )
    await client.start()
    try:
        with pytest.raises(Unreachable) as caught:
            await client.connected(DEADLINE)
        assert caught.value.attempts == 3 and caught.value.url == url
    finally:
        await client.close()


async def test_a_silent_link_is_dropped_after_two_heartbeats_and_resumed(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    import os
    import signal

    proc = gateway_process(make_settings(heartbeat_seconds=1.0))
    assert proc.proc is not None
    states: list[str] = []
    client = TocsinClient(
        proc.ws_url,
        token("sdk-p"),
        client_id="p1",
        connect_timeout=2,
        on_state=lambda s, _: states.append(s),
    )
    await client.start()
    try:
        await client.connected(DEADLINE)
        handler = Handler().run(client)
        first = await publish(js, names, 1)
        await handler.until(1)
        os.kill(proc.proc.pid, signal.SIGSTOP)  # frozen: the socket stays open, silent
        try:
            await eventually(lambda: client.state != "connected", LONG, "the dead link seen")
            during = await publish(js, names, 2)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        await eventually(lambda: client.connections == 2, LONG, "the reconnect")
        await handler.until(3, LONG)
        assert handler.ids == ids_of(first + during)
        assert "waiting" in states
    finally:
        await client.close()
