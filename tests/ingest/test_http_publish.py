"""``POST /api/v1/alerts`` (CONTRACT §5) on a real gateway port against a real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names

from ..support import DEADLINE, RunningGateway, alert, token

LIMIT = 64 * 1024


def publisher(ttl: float = 3600) -> str:
    return token("engine", ("KE",), roles=("publisher",), ttl=ttl)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
        yield session


async def post_json(
    http: aiohttp.ClientSession, gateway: RunningGateway, body: Any, tok: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = bearer(tok) if tok else {}
    async with http.post(f"{gateway.http}/api/v1/alerts", json=body, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def post_raw(
    http: aiohttp.ClientSession,
    gateway: RunningGateway,
    data: Any,
    content_type: str,
    tok: str | None = None,
) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": content_type, **(bearer(tok) if tok else {})}
    async with http.post(f"{gateway.http}/api/v1/alerts", data=data, headers=headers) as resp:
        assert resp.content_type == "application/json", await resp.text()
        return resp.status, await resp.json()


async def count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def nothing_appended(js: JetStreamContext, names: Names) -> None:
    """The handler answers after its append: once answered, nothing more can appear."""
    assert await count(js, names.alerts_stream) == 0
    assert await count(js, names.dlq_stream) == 0  # HTTP rejections are not dead-lettered


def padded(body: dict[str, Any], size: int) -> bytes:
    """``body`` as valid JSON of exactly ``size`` bytes (whitespace before the last brace)."""
    raw = orjson.dumps(body)
    return raw[:-1] + b" " * (size - len(raw)) + b"}"


# --- success and duplicates ---------------------------------------------------------------
async def test_publish_returns_202_and_alert_is_in_alerts_at_seq(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    body = alert("KE-30", alert_level="medium", alert_type="data_quality")
    status, reply = await post_json(http, gateway, body, publisher())
    assert status == 202, reply
    assert set(reply) == {"alert_id", "seq", "duplicate"}
    assert reply["alert_id"] == body["alert_id"]
    assert reply["duplicate"] is False
    assert isinstance(reply["seq"], int) and reply["seq"] >= 1

    msg = await js.get_msg(names.alerts_stream, reply["seq"])
    assert msg.subject == f"{names.namespace}.alerts.KE.KE-30.medium.data_quality"
    assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == str(body["alert_id"])
    assert msg.data is not None
    kept = orjson.loads(msg.data)
    assert {k: kept[k] for k in body} == body
    assert await count(js, names.alerts_stream) == 1


async def test_publishing_the_same_alert_again_is_a_duplicate_with_the_same_seq(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    body = alert("KE-30", alert_id="engine-run-7.alert-1")
    tok = publisher()
    status, first = await post_json(http, gateway, body, tok)
    assert status == 202 and first["duplicate"] is False, first
    status, again = await post_json(http, gateway, body, tok)
    assert status == 202, again
    assert again == {"alert_id": body["alert_id"], "seq": first["seq"], "duplicate": True}
    assert await count(js, names.alerts_stream) == 1


async def test_an_integer_alert_id_and_its_decimal_string_are_one_alert(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    tok = publisher()
    status, first = await post_json(http, gateway, alert("KE-30", alert_id=700024863), tok)
    assert status == 202 and first["duplicate"] is False, first
    status, again = await post_json(http, gateway, alert("KE-30", alert_id="700024863"), tok)
    assert status == 202 and again["duplicate"] is True and again["seq"] == first["seq"], again
    assert await count(js, names.alerts_stream) == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"alert_id": 2**53}, "alert_id"),  # rounds in JavaScript and Dart
        ({"alert_id": 9007199254740993}, "alert_id"),
        ({"risk_score": "0.8"}, "risk_score"),
        ({"risk_score": True}, "risk_score"),
        ({"confidence_score": "0.9"}, "confidence_score"),
        ({"affected_population": "5"}, "affected_population"),
        ({"affected_population": 5.0}, "affected_population"),
        ({"action_required": "true"}, "action_required"),
        ({"action_required": 1}, "action_required"),
        ({"location": {"region": "KE", "lat": "1", "lon": 2}}, "location.lat"),
    ],
)
async def test_fields_are_checked_strictly_and_the_error_names_the_field(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    change: dict[str, Any],
    field: str,
) -> None:
    status, body = await post_json(http, gateway, {**alert("KE-30"), **change}, publisher())
    assert status == 422 and body["error"] == "invalid_alert", body
    assert body["errors"][0]["field"].startswith(field), body
    await nothing_appended(js, names)


async def test_the_largest_exact_integer_alert_id_is_accepted(
    gateway: RunningGateway, js: JetStreamContext, http: aiohttp.ClientSession
) -> None:
    status, body = await post_json(http, gateway, alert("KE-30", alert_id=2**53 - 1), publisher())
    assert status == 202 and body["alert_id"] == 2**53 - 1, body


async def test_json_with_charset_parameter_is_accepted(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    body = alert()
    status, reply = await post_raw(
        http, gateway, orjson.dumps(body), "application/json; charset=utf-8", publisher()
    )
    assert status == 202 and reply["alert_id"] == body["alert_id"], reply
    assert await count(js, names.alerts_stream) == 1


async def test_expiring_alert_over_http_carries_ttl_headers(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    expires = datetime.now(UTC) + timedelta(minutes=10)
    body = alert(expiry_time=expires.isoformat())
    status, reply = await post_json(http, gateway, body, publisher())
    assert status == 202, reply
    msg = await js.get_msg(names.alerts_stream, reply["seq"])
    assert msg.headers is not None
    assert msg.headers["Nats-TTL"].isdigit() and 590 <= int(msg.headers["Nats-TTL"]) <= 601
    assert float(msg.headers["Tocsin-Expires"]) == pytest.approx(expires.timestamp(), abs=1e-3)


# --- 422: a bad alert names its field and is not appended ---------------------------------
BAD_BODIES: dict[str, tuple[dict[str, Any], str, str]] = {
    "missing-region": (alert(location={}), "invalid_alert", "location.region"),
    "bad-region": (alert(location={"region": "Kenya"}), "invalid_alert", "location.region"),
    "risk-over-one": (alert(risk_score=1.5), "invalid_alert", "risk_score"),
    "unknown-field": (alert(severity=3), "invalid_alert", "severity"),
    "missing-title": ({k: v for k, v in alert().items() if k != "title"}, "invalid_alert", "title"),
    "unknown-type": (alert(alert_type="earthquake"), "unknown_type", "alert_type"),
    "expired": (alert(expiry_time="2020-01-01T00:00:00Z"), "expired", "expiry_time"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_alert_is_422_naming_the_field_and_nothing_is_appended(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    body, error, field = BAD_BODIES[case]
    status, reply = await post_json(http, gateway, body, publisher())
    assert status == 422, reply
    assert reply["error"] == error
    assert field in [e["field"] for e in reply["errors"]], reply
    assert field in reply["detail"]
    await nothing_appended(js, names)


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b""], ids=["broken", "array", "empty"])
async def test_body_that_is_not_a_json_object_is_422(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    raw: bytes,
) -> None:
    status, reply = await post_raw(http, gateway, raw, "application/json", publisher())
    assert status == 422, reply
    assert reply["error"] == "invalid_json" and reply["errors"], reply
    await nothing_appended(js, names)


# --- 401 / 403: tokens -------------------------------------------------------------------
AUTH_FAILURES = {
    "no-token": (None, "missing_token"),
    "expired": (token("engine", ("KE",), roles=("publisher",), ttl=-60), "token_expired"),
    "bad-signature": (
        token(
            "engine", ("KE",), roles=("publisher",), secret="another-secret-0123456789abcdef-01234"
        ),
        "invalid_signature",
    ),
    "malformed": ("not.a.jwt", "malformed_token"),
}


@pytest.mark.parametrize("case", list(AUTH_FAILURES))
async def test_without_a_proper_token_it_is_401_json(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    tok, error = AUTH_FAILURES[case]
    status, reply = await post_json(http, gateway, alert(), tok)
    assert status == 401, reply
    assert set(reply) == {"error", "detail"}
    assert reply["error"] == error and reply["detail"], reply
    await nothing_appended(js, names)


@pytest.mark.parametrize("roles", [("health_worker",), ("viewer", "analyst")])
async def test_token_without_publisher_role_is_403(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    roles: tuple[str, ...],
) -> None:
    tok = token("alice", ("KE",), roles=roles)
    status, reply = await post_json(http, gateway, alert(), tok)
    assert status == 403, reply
    assert reply["error"] == "forbidden" and "publisher" in reply["detail"], reply
    await nothing_appended(js, names)


async def test_token_in_query_parameter_is_accepted(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    body = alert()
    async with http.post(
        f"{gateway.http}/api/v1/alerts", json=body, params={"auth_token": publisher()}
    ) as resp:
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["alert_id"] == body["alert_id"]


# --- 415 / 413: what the body is and how big ------------------------------------------------
@pytest.mark.parametrize(
    "content_type", ["application/xml", "text/plain", "application/x-www-form-urlencoded"]
)
async def test_non_json_content_type_is_415(
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    http: aiohttp.ClientSession,
    content_type: str,
) -> None:
    data = (
        b"<alert><alert_id>1</alert_id></alert>" if "xml" in content_type else orjson.dumps(alert())
    )
    status, reply = await post_raw(http, gateway, data, content_type, publisher())
    assert status == 415, reply
    assert reply["error"] == "unsupported_media_type" and reply["detail"], reply
    await nothing_appended(js, names)


async def test_body_over_64_kib_is_413(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    raw = padded(alert(), LIMIT + 1)  # valid JSON, one byte over
    status, reply = await post_raw(http, gateway, raw, "application/json", publisher())
    assert status == 413, reply
    assert reply["error"] == "too_large", reply
    await nothing_appended(js, names)


async def test_chunked_body_over_64_kib_is_413(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    raw = padded(alert(), 2 * LIMIT)

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: Transfer-Encoding chunked
        for i in range(0, len(raw), 8192):
            yield raw[i : i + 8192]

    status, reply = await post_raw(http, gateway, chunks(), "application/json", publisher())
    assert status == 413, reply
    assert reply["error"] == "too_large", reply
    await nothing_appended(js, names)


async def test_body_of_exactly_64_kib_is_accepted(
    gateway: RunningGateway, js: JetStreamContext, names: Names, http: aiohttp.ClientSession
) -> None:
    body = alert()
    status, reply = await post_raw(
        http, gateway, padded(body, LIMIT), "application/json", publisher()
    )
    assert status == 202, reply
    assert reply["alert_id"] == body["alert_id"]
    assert await count(js, names.alerts_stream) == 1


async def test_body_arriving_in_two_pieces_is_read_whole(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    """A body that crosses TCP segments (any real network) must be read to its end.

    Raw HTTP/1.1: headers and half the body, then a bounded wait in which a correct
    server says nothing (it is still reading), then the rest.
    """
    body = alert()
    raw = orjson.dumps(body)
    half = len(raw) // 2
    head = (
        "POST /api/v1/alerts HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gateway.port}\r\n"
        f"Authorization: Bearer {publisher()}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(head + raw[:half])
        await writer.drain()
        try:
            early = await asyncio.wait_for(reader.read(65536), 0.5)
        except TimeoutError:
            early = b""
        assert early == b"", f"answered before the body was complete:\n{early.decode()}"
        writer.write(raw[half:])
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"202", response.decode()
    reply = orjson.loads(rest.partition(b"\r\n\r\n")[2])
    assert reply == {"alert_id": body["alert_id"], "seq": reply["seq"], "duplicate": False}
    assert await count(js, names.alerts_stream) == 1


async def test_metrics_count_what_publishing_stored_and_refused(
    http: aiohttp.ClientSession, gateway: RunningGateway
) -> None:
    from ..gateway.test_metrics import scrape, value

    body = alert()
    assert (await post_json(http, gateway, body, publisher()))[0] == 202
    assert (await post_json(http, gateway, body, publisher()))[0] == 202  # a duplicate
    assert (await post_json(http, gateway, alert(), publisher()))[0] == 202
    bad = alert(alert_level="apocalyptic")
    assert (await post_json(http, gateway, bad, publisher()))[0] == 422
    assert (await post_json(http, gateway, bad, publisher()))[0] == 422
    families = await scrape(gateway.http)
    assert value(families, "tocsin_ingest_alerts_accepted_total") == 2
    assert value(families, "tocsin_ingest_duplicates_total") == 1
    assert value(families, "tocsin_ingest_alerts_rejected_total", reason="invalid_alert") == 2
    assert value(families, "tocsin_ingest_alerts_rejected_total", reason="invalid_json") == 0
