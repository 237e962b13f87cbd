"""GET /api/v1/alerts/stats and its NATS twin on a real gateway: exact after known traffic."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import Client, RunningGateway, alert, append, eventually, start_gateway, token
from .test_metrics import histogram_count, scrape

STATS = "/api/v1/alerts/stats"


async def get_stats(http: str, tok: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with aiohttp.ClientSession() as s, s.get(http + STATS, headers=headers) as r:
        return r.status, await r.json()


ANALYST = token("ops", (), roles=("analyst",))


async def test_the_stats_are_for_admins_and_analysts(gateway: RunningGateway) -> None:
    assert (await get_stats(gateway.http, None))[0] == 401
    status, body = await get_stats(gateway.http, "not-a-token")
    assert status == 401 and body["error"]
    status, body = await get_stats(gateway.http, token("hw", ("KE",)))
    assert status == 403 and "admin" in body["detail"]
    assert (await get_stats(gateway.http, token("root", (), roles=("admin",))))[0] == 200
    status, body = await get_stats(gateway.http, ANALYST)
    assert status == 200
    for key in (
        "active_connections",
        "healthy_connections",
        "avg_latency_ms",
        "messages_sent",
        "rate_limit_violations",
        "system_health",
        "offline_queues",
    ):
        assert key in body, key
    assert body["system_health"]["nats_connected"] is True
    assert set(body["offline_queues"]) >= {"total_queued_messages", "queued_users"}


async def queued_in_jetstream(js: JetStreamContext, names: Names) -> tuple[int, set[str]]:
    total, users = 0, set()
    for info in await js.consumers_info(names.alerts_stream):
        device = names.parse_device_consumer(info.name or "")
        waiting = (info.num_pending or 0) + (info.num_ack_pending or 0)
        if device is not None and waiting:
            total += waiting
            users.add(device[0])
    return total, users


async def test_counts_are_exact_after_known_traffic(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    # No resend within the test (backoff 60 s): every frame written is a first send.
    running = await start_gateway(make_settings(redelivery_backoff=[60.0], stats_cache_seconds=0))
    users = ["ana", "ben", "cai"]
    try:
        before = (await get_stats(running.http, ANALYST))[1]
        assert before["active_connections"] == 0 and before["messages_sent"] == 0
        clients = [await Client.connect(running.ws_url, token(u, ("KE",))) for u in users]
        for c in clients:
            await c.next("connection_established")
        stats = (await get_stats(running.http, ANALYST))[1]
        assert stats["active_connections"] == stats["healthy_connections"] == len(users)

        n = 4
        for _ in range(n):
            await append(js, names, alert("KE-30"))
        for c in clients:
            await c.alerts(n, ack=True)
        stats = (await get_stats(running.http, ANALYST))[1]
        assert stats["messages_sent"] == n * len(users)  # written before they were read
        assert stats["avg_latency_ms"] is not None and stats["avg_latency_ms"] >= 0
        assert stats["rate_limit_violations"] == 0
        families = await scrape(running.http)
        assert histogram_count(families, "tocsin_delivery_latency_seconds", path="live") == n * 3
        assert histogram_count(families, "tocsin_delivery_latency_seconds", path="backlog") == 0
        assert histogram_count(families, "tocsin_gateway_handshake_seconds") == len(users)
        health = stats["system_health"]
        assert health["nats_connected"] and health["all_background_tasks_running"]
        tasks = health["background_tasks_running"]
        assert {"ticker", "checkpoints", "records", "live_feed", "collector"} <= set(tasks)
        assert all(t["running"] for t in tasks.values())

        async def ticked() -> bool:  # its first pass ends a quarter second after start
            body = (await get_stats(running.http, ANALYST))[1]
            return (
                body["system_health"]["background_tasks_running"]["ticker"]["last_run"] is not None
            )

        await eventually(ticked, what="the ticker's first pass")

        for c in clients:
            await c.close()
        await eventually(lambda: len(running.gw.sessions) == 0, what="the sessions to end")
        k = 2
        for _ in range(k):
            await append(js, names, alert("KE-30"))

        async def queued() -> bool:
            total, who = await queued_in_jetstream(js, names)
            return total == k * len(users) and who == set(users)

        await eventually(queued, what="JetStream to hold the backlog")
        queues = (await get_stats(running.http, ANALYST))[1]["offline_queues"]
        assert queues["total_queued_messages"] == k * len(users)
        assert queues["queued_users"] == queues["queued_devices"] == len(users)
        assert queues["device_queues"] == len(users)

        again = await Client.connect(running.ws_url, token("ana", ("KE",)))
        hello = await again.next("connection_established")
        assert hello["pending"] == k
        await again.alerts(k, ack=True)
        families = await scrape(running.http)
        assert histogram_count(families, "tocsin_delivery_latency_seconds", path="backlog") == k
        assert histogram_count(families, "tocsin_gateway_catchup_seconds") >= 1
        stats = (await get_stats(running.http, ANALYST))[1]
        assert stats["messages_sent"] == n * len(users) + k
        await again.close()
    finally:
        await running.stop()


async def test_every_gateway_answers_on_nats(
    gateway: RunningGateway, nc: NatsClient, names: Names
) -> None:
    reply = await nc.request(names.gateways_stats_subject, b"", timeout=5)
    body = orjson.loads(reply.data)
    assert body["instance"] == gateway.gw.instance
    assert body["active_connections"] == 0
