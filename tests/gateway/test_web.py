"""The gateway's browser routes (gateway/web.py): the pages and their headers, the
development sign-in's guards, the dashboard's figures. The pages themselves run in Chromium
in tests/clients/test_web_pages.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
from nats.js import JetStreamContext

from tocsin.core.settings import Settings

from ..conftest import SECRET
from ..support import Client, RunningGateway, alert, append, start_gateway, token


async def get(url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def post(url: str, body: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body, **kw) as resp:
        return resp.status, await resp.json()


async def test_pages_and_the_client_are_served_with_a_strict_policy(
    gateway: RunningGateway,
) -> None:
    for path, kind, marker in [
        ("/", "text/html", b'id="alerts"'),
        ("/dashboard", "text/html", b'id="tiles"'),
        ("/static/tocsin.js", "text/javascript", b"export class TocsinClient"),
        ("/static/style.css", "text/css", b".alert"),
    ]:
        status, headers, body = await get(gateway.http + path)
        assert status == 200, path
        assert headers["Content-Type"].startswith(kind), path
        assert marker in body, path
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
    status, _, _ = await get(gateway.http + "/static/../app.py")
    assert status == 404
    status, _, _ = await get(gateway.http + "/static/web.py")
    assert status == 404


async def test_the_dev_sign_in_is_off_by_default(gateway: RunningGateway) -> None:
    status, _, body = await get(gateway.http + "/api/v1/web/config")
    assert status == 200 and b'"dev_sign_in": false' in body
    status, answer = await post(gateway.http + "/api/v1/dev/token", {"user": "a", "regions": "KE"})
    assert status == 404
    assert answer["error"] == "not_found"


async def test_the_dev_sign_in_mints_checked_tokens_for_local_callers_only(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    running = await start_gateway(make_settings(dev_sign_in=True))
    try:
        url = running.http + "/api/v1/dev/token"
        status, answer = await post(url, {"user": "amina", "regions": "KE,UG-102"})
        assert status == 200
        claims = jwt.decode(answer["token"], SECRET, algorithms=["HS256"])
        assert claims["sub"] == "amina"
        assert claims["regions"] == ["KE", "UG-102"]
        assert claims["roles"] == ["health_worker"]
        for body, field in [
            ({"user": "", "regions": ["KE"]}, "user"),
            ({"user": "a", "regions": ["Kenya"]}, "regions"),
            ({"user": "a", "regions": ["KE"], "roles": ["root"]}, "roles"),
            ({"user": "a", "regions": ["KE"], "ttl": 0}, "ttl"),
            ({"user": "a"}, "regions"),  # a non-admin token needs a region
        ]:
            status, answer = await post(url, body)
            assert status == 422, body
            assert answer["detail"].startswith(f"{field}:"), answer
        status, answer = await post(
            url, {"user": "a", "regions": "KE"}, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert status == 403, "a request through a proxy is not local"
    finally:
        await running.stop()


async def test_the_dashboard_figures_need_a_reader_and_count_deliveries(
    gateway: RunningGateway, js: JetStreamContext, names: Any
) -> None:
    url = gateway.http + "/api/v1/dashboard"
    status, _, _ = await get(url)
    assert status == 401
    status, _, _ = await get(url, headers={"Authorization": f"Bearer {token('eve')}"})
    assert status == 403
    reader = {"Authorization": f"Bearer {token('ops', roles=('analyst',))}"}
    client = await Client.connect(gateway.ws_url, token("dede"))
    try:
        await client.next("connection_established")
        for _ in range(3):
            await append(js, names, alert())
        await client.alerts(3, ack=True)
        async with aiohttp.ClientSession() as http, http.get(url, headers=reader) as resp:
            body = await resp.json()
    finally:
        await client.close()
    assert body["stats"]["messages_sent"] == 3
    live = body["latency"]["live"]
    assert sum(live["counts"]) == 3
    assert len(live["counts"]) == len(live["bounds"]) + 1
    assert [g["instance"] for g in body["gateways"]["replies"]] == [gateway.gw.instance]
