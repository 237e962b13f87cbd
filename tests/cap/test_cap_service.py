"""CAP through the real pipeline: a real nats-server, a real gateway, the ingest service.

In: POST /api/v1/alerts with application/cap+xml, and CAP XML on ingest.alerts (bad CAP to
INGEST_DLQ). Out: GET /api/v1/alerts/{alert_id} as JSON and CAP (schema-valid), the Atom
feed. Supersede: an update or cancel live and from a backlog, across a gateway restart.
Held (status not Actual): no device receives it, admins read it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import orjson
import pytest
from defusedxml.ElementTree import fromstring
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tocsin.cap import CapRules, parse_cap, to_alert
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.alerts_http import ATOM_NS
from tocsin.schemas import Alert

from ..ingest.test_ingest_service import Ingest
from ..support import DEADLINE, Client, RunningGateway, eventually, start_gateway, token
from .test_mapping import fixture, mapped

CAP_TYPES = ["Rescue=public_safety", "Geo=earthquake", "Health=outbreak_risk"]


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(alert_types=["public_safety", "earthquake"], cap_alert_types=CAP_TYPES)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


def auth(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


PUBLISHER = token("engine", ("KE",), roles=("publisher",))
ADMIN = token("root", (), roles=("admin",))
KENYA = token("wanjiru", ("KE",), roles=("health_worker",))
UGANDA = token("okello", ("UG",), roles=("health_worker",))


async def post_cap(
    http: aiohttp.ClientSession, gateway: RunningGateway, raw: bytes
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/cap+xml", **auth(PUBLISHER)}
    async with http.post(f"{gateway.http}/api/v1/alerts", data=raw, headers=headers) as resp:
        return resp.status, await resp.json()


async def get_alert(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    alert_id: object,
    tok: str,
    accept: str = "application/json",
) -> tuple[int, bytes, str]:
    headers = {"Accept": accept, **auth(tok)}
    async with http.get(f"{gateway.http}/api/v1/alerts/{alert_id}", headers=headers) as resp:
        return resp.status, await resp.read(), resp.content_type


# --- HTTP in, HTTP out ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["amber.xml", "earthquake_first.xml", "health_cholera.xml", "homeland_security.xml"]
)
async def test_cap_posted_is_stored_and_read_back_as_json_and_cap(
    name: str, gateway: RunningGateway, http: aiohttp.ClientSession, settings: Settings
) -> None:
    raw = fixture(name)
    if name == "homeland_security.xml":  # Security: not mapped by these settings
        status, body = await post_cap(http, gateway, raw)
        assert status == 422 and body["error"] == "unknown_type", body
        assert body["errors"][0]["field"] == "info.category"
        return
    expected, meta = mapped(name)
    status, body = await post_cap(http, gateway, raw)
    assert status == 202, body
    assert body["alert_id"] == expected.alert_id and body["seq"] >= 1
    status, data, ctype = await get_alert(http, gateway, expected.alert_id, ADMIN)
    assert (status, ctype) == (200, "application/json")
    assert Alert.model_validate_json(data) == expected
    status, data, ctype = await get_alert(
        http, gateway, expected.alert_id, ADMIN, "application/cap+xml"
    )
    assert (status, ctype) == (200, "application/cap+xml")
    again, meta_again = to_alert(parse_cap(data), CapRules.from_settings(settings))
    assert again == expected
    assert (meta_again.sender, meta_again.identifier, meta_again.sent) == (
        meta.sender,
        meta.identifier,
        meta.sent,
    )


async def test_get_alert_auth_and_404(gateway: RunningGateway, http: aiohttp.ClientSession) -> None:
    alert, _ = mapped("health_cholera.xml")
    assert (await post_cap(http, gateway, fixture("health_cholera.xml")))[0] == 202
    assert (await get_alert(http, gateway, alert.alert_id, KENYA))[0] == 200
    assert (await get_alert(http, gateway, alert.alert_id, UGANDA))[0] == 403
    analyst = token("ana", (), roles=("analyst",))
    assert (await get_alert(http, gateway, alert.alert_id, analyst))[0] == 200
    assert (await get_alert(http, gateway, alert.alert_id, "not-a-token"))[0] == 401
    assert (await get_alert(http, gateway, "cap-0000", ADMIN))[0] == 404
    assert (await get_alert(http, gateway, "no%20such", ADMIN))[0] == 404


async def test_json_alert_is_read_back_as_cap_by_integer_id(
    gateway: RunningGateway, http: aiohttp.ClientSession, settings: Settings
) -> None:
    body = {
        "alert_id": 1042,
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "Malaria outbreak risk rising",
        "message": "Risk model predicts a rise",
        "location": {"region": "KE-30", "lat": -0.09, "lon": 34.77},
        "risk_score": 0.82,
    }
    async with http.post(
        f"{gateway.http}/api/v1/alerts", json=body, headers=auth(PUBLISHER)
    ) as resp:
        assert resp.status == 202, await resp.text()
    status, data, _ = await get_alert(http, gateway, 1042, KENYA, "application/cap+xml")
    assert status == 200
    again, meta = to_alert(parse_cap(data), CapRules.from_settings(settings))
    assert str(again.alert_id) == "1042" and meta.sender == settings.cap_sender
    assert again.risk_score == 0.82 and again.location.lat == -0.09


# --- NATS in ---------------------------------------------------------------------------------
@pytest.fixture
async def ingest(settings: Settings, js: JetStreamContext) -> AsyncIterator[Ingest]:
    service = Ingest(settings)
    await service.start()
    yield service
    await service.stop()


async def test_cap_on_ingest_subject_is_appended_and_bad_cap_dead_lettered(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    alert, _ = mapped("amber.xml")
    await nc.publish(names.ingest_subject, fixture("amber.xml"))
    bad = fixture("amber.xml").replace(b"<urgency>Immediate", b"<urgency>Soon")
    await nc.publish(names.ingest_subject, bad)

    async def both() -> bool:
        a = (await js.stream_info(names.alerts_stream)).state.messages
        d = (await js.stream_info(names.dlq_stream)).state.messages
        return a == 1 and d == 1

    await eventually(both, what="one alert and one dead letter")
    stored = await js.get_msg(names.alerts_stream, 1)
    assert Alert.model_validate_json(stored.data or b"").alert_id == alert.alert_id
    dead = await js.get_last_msg(names.dlq_stream, names.dlq_subject("invalid_cap"))
    assert dead.data == bad  # as sent
    assert "info.urgency" in (dead.headers or {})["Tocsin-Errors"]


# --- supersede -------------------------------------------------------------------------------
async def test_online_device_gets_alert_then_cancel_live(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    client = await Client.connect(gateway.ws_url, KENYA)
    await client.next("connection_established")
    first, _ = mapped("health_cholera.xml")
    cancel, _ = mapped("health_cholera_cancel.xml")
    assert (await post_cap(http, gateway, fixture("health_cholera.xml")))[0] == 202
    assert (await post_cap(http, gateway, fixture("health_cholera_cancel.xml")))[0] == 202
    got = await client.alerts(2, ack=True)
    assert [f["alert"]["alert_id"] for f in got] == [first.alert_id, cancel.alert_id]
    assert got[1]["alert"]["msg_type"] == "cancel"
    assert got[1]["alert"]["references"] == list(cancel.references)
    await client.close()


async def test_offline_device_through_alert_and_cancel_gets_only_the_cancel(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    first, _ = mapped("health_cholera.xml")
    cancel, _ = mapped("health_cholera_cancel.xml")
    frames = await replay(gateway, http, ["health_cholera.xml", "health_cholera_cancel.xml"])
    assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == [cancel.alert_id]
    assert [f for f in frames if f["type"] == "backlog_superseded"] == [
        {"type": "backlog_superseded", "alert_id": first.alert_id, "superseded_by": cancel.alert_id}
    ]


async def test_offline_through_alert_update_cancel_gets_only_the_cancel(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    cancel, _ = mapped("health_cholera_cancel.xml")
    frames = await replay(
        gateway,
        http,
        ["health_cholera.xml", "health_cholera_update.xml", "health_cholera_cancel.xml"],
    )
    assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == [cancel.alert_id]
    assert sum(f["type"] == "backlog_superseded" for f in frames) == 2


async def test_offline_through_alert_and_update_gets_the_update(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    update, _ = mapped("health_cholera_update.xml")
    frames = await replay(gateway, http, ["health_cholera.xml", "health_cholera_update.xml"])
    alerts = [f["alert"] for f in frames if f["type"] == "alert"]
    assert [a["alert_id"] for a in alerts] == [update.alert_id]
    assert alerts[0]["alert_level"] == "critical" and alerts[0]["msg_type"] == "update"


async def test_an_update_of_an_alert_the_device_acked_is_just_delivered(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    first, _ = mapped("health_cholera.xml")
    update, _ = mapped("health_cholera_update.xml")
    client = await Client.connect(gateway.ws_url, KENYA)
    await client.next("connection_established")
    assert (await post_cap(http, gateway, fixture("health_cholera.xml")))[0] == 202
    assert [f["alert"]["alert_id"] for f in await client.alerts(1, ack=True)] == [first.alert_id]
    await client.close()
    assert (await post_cap(http, gateway, fixture("health_cholera_update.xml")))[0] == 202
    frames = await replay(gateway, http, [], introduce=False)
    assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == [update.alert_id]
    assert not [f for f in frames if f["type"] == "backlog_superseded"]


async def test_supersede_holds_across_a_gateway_restart(
    settings: Settings, js: JetStreamContext, http: aiohttp.ClientSession
) -> None:
    gateway = await start_gateway(settings)
    try:
        await Client.introduce(gateway.ws_url, KENYA)
        for name in ("health_cholera.xml", "health_cholera_cancel.xml"):
            assert (await post_cap(http, gateway, fixture(name)))[0] == 202
    finally:
        await gateway.stop()
    again = await start_gateway(settings)  # a new process' view: the index read from NATS
    try:
        assert len(again.gw.supersessions) == 2
        cancel, _ = mapped("health_cholera_cancel.xml")
        frames = await replay(again, http, [], introduce=False)
        assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == [cancel.alert_id]
    finally:
        await again.stop()


async def replay(
    gateway: RunningGateway,
    http: aiohttp.ClientSession,
    names: list[str],
    introduce: bool = True,
) -> list[dict[str, Any]]:
    """A device seen once (``introduce``), away while ``names`` are posted; back, every
    frame it gets until its backlog is read and nothing more comes."""
    if introduce:
        await Client.introduce(gateway.ws_url, KENYA)
    for name in names:
        assert (await post_cap(http, gateway, fixture(name)))[0] == 202
    client = await Client.connect(gateway.ws_url, KENYA)
    established = await client.next("connection_established")
    frames: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while True:
        try:
            frame = await client.next(timeout=1.0)
        except (AssertionError, TimeoutError):
            break
        frames.append(frame)
        if frame["type"] == "alert":
            await client.send({"type": "ack", "seq": frame["seq"]})
        assert asyncio.get_running_loop().time() < deadline, frames
    await client.close()
    assert established["pending"] >= sum(f["type"] == "alert" for f in frames)
    return frames


# --- held ------------------------------------------------------------------------------------
async def test_exercise_reaches_no_device_and_admins_read_it(
    gateway: RunningGateway, http: aiohttp.ClientSession, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, KENYA)
    await client.next("connection_established")
    held, _ = mapped("health_exercise.xml")
    status, body = await post_cap(http, gateway, fixture("health_exercise.xml"))
    assert status == 202 and body["held"] == "Exercise" and body["seq"] is None, body
    assert (await js.stream_info(names.alerts_stream)).state.messages == 0
    # A plain alert after it arrives alone: the exercise was never in the device's stream.
    assert (await post_cap(http, gateway, fixture("health_cholera.xml")))[0] == 202
    first, _ = mapped("health_cholera.xml")
    assert [f["alert"]["alert_id"] for f in await client.alerts(1)] == [first.alert_id]
    await client.close()
    assert (await get_alert(http, gateway, held.alert_id, KENYA))[0] == 404
    status, data, _ = await get_alert(http, gateway, held.alert_id, ADMIN, "application/cap+xml")
    assert status == 200 and b"<status>Exercise</status>" in data
    parse_cap(data)


# --- the feed ---------------------------------------------------------------------------------
async def test_feed_lists_current_alerts_without_superseded_ones(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    for name in ("amber.xml", "health_cholera.xml", "health_cholera_update.xml"):
        assert (await post_cap(http, gateway, fixture(name)))[0] == 202
    update, _ = mapped("health_cholera_update.xml")
    amber, _ = mapped("amber.xml")

    async def entries(tok: str) -> list[tuple[str, str]]:
        async with http.get(f"{gateway.http}/api/v1/alerts/feed", headers=auth(tok)) as resp:
            assert resp.status == 200 and resp.content_type == "application/atom+xml"
            root = fromstring(await resp.read())
        ns = {"a": ATOM_NS}
        return [
            (e.findtext("a:title", namespaces=ns) or "", e.find("a:link", ns).get("href") or "")  # type: ignore[union-attr]
            for e in root.findall("a:entry", ns)
        ]

    listed = await entries(ADMIN)
    assert [t for t, _ in listed] == [update.title, amber.title]  # newest first, no superseded
    assert [t for t, _ in await entries(KENYA)] == [update.title]  # the token's regions
    async with http.get(f"{gateway.http}/api/v1/alerts/feed") as resp:
        assert resp.status == 401
    first, _ = mapped("health_cholera.xml")
    async with http.get(
        f"{gateway.http}/api/v1/alerts/{first.alert_id}", headers=auth(ADMIN)
    ) as resp:
        assert resp.status == 200  # superseded, still readable, and says by what
        assert resp.headers["Tocsin-Superseded-By"] == update.alert_id
    href = listed[0][1]
    async with http.get(href, headers={"Accept": "application/cap+xml", **auth(ADMIN)}) as resp:
        assert resp.status == 200
        parse_cap(await resp.read())  # each entry links to a schema-valid CAP document


async def test_a_superseded_alert_the_device_does_not_want_is_not_announced(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    # The device's filter (a bbox around Nairobi, judged in the gateway) takes the update,
    # moved there, but not the alert it updates (Homa Bay): that one is passed over
    # unannounced, as any alert outside the filter.
    await Client.introduce(gateway.ws_url, KENYA, location_filter='{"bbox":[36,-2,37.5,-1]}')
    moved = fixture("health_cholera_update.xml").replace(
        b"<circle>-0.5273,34.4571 15</circle>", b"<circle>-1.2921,36.8219 15</circle>"
    )
    assert (await post_cap(http, gateway, fixture("health_cholera.xml")))[0] == 202
    assert (await post_cap(http, gateway, moved))[0] == 202
    update, _ = mapped("health_cholera_update.xml")
    frames = await replay(gateway, http, [], introduce=False)
    assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == [update.alert_id]
    assert not [f for f in frames if f["type"] == "backlog_superseded"]


async def test_json_update_and_cancel_supersede_by_integer_id(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """Not only CAP: alert JSON with msg_type and references (CONTRACT §4) supersedes too;
    every frame and stored alert is valid against the published JSON Schemas."""
    await Client.introduce(gateway.ws_url, KENYA)
    base = {
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "Measles cases rising",
        "message": "Vaccination campaign starts Monday",
        "location": {"region": "KE-47"},
    }
    bodies = [
        {**base, "alert_id": 5001},
        {**base, "alert_id": 5002, "msg_type": "update", "references": [5001]},
        {**base, "alert_id": "5003", "msg_type": "cancel", "references": ["5001", 5002]},
    ]
    for body in bodies:
        async with http.post(
            f"{gateway.http}/api/v1/alerts", json=body, headers=auth(PUBLISHER)
        ) as resp:
            assert resp.status == 202, await resp.text()
    frames = await replay(gateway, http, [], introduce=False)
    server_frame = json_schema("server-frame.json")
    for frame in frames:
        jsonschema.validate(frame, server_frame)
    assert [f["alert"]["alert_id"] for f in frames if f["type"] == "alert"] == ["5003"]
    assert [
        (f["alert_id"], f["superseded_by"]) for f in frames if f["type"] == "backlog_superseded"
    ] == [(5001, 5003), (5002, 5003)]  # decimal ids as integers: the same alerts (CONTRACT §4)
    status, data, _ = await get_alert(http, gateway, 5002, KENYA)
    assert status == 200
    jsonschema.validate(orjson.loads(data), json_schema("alert.json"))


def json_schema(name: str) -> dict[str, Any]:
    path = Path(__file__).resolve().parents[2] / "schemas" / "json" / name
    loaded: dict[str, Any] = orjson.loads(path.read_bytes())
    return loaded
