"""The ingest service in-process against a real nats-server: INGEST -> ALERTS | INGEST_DLQ.

Events are published with core NATS to ``ingest.alerts`` (as the engine does); JetStream
captures them into the ``INGEST`` work queue and the faststream app drains it. Every wait
is a condition with a deadline (``eventually``), never a sleep.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from faststream import FastStream
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import NotFoundError

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.ingest.app import create_app
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import Alert

from ..support import DEADLINE, RunningGateway, alert, eventually, token


# --- helpers -----------------------------------------------------------------------------
class Ingest:
    """One ingest service (a faststream app) in this process; start/stop at will."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: FastStream | None = None

    async def start(self) -> FastStream:
        assert self.app is None, "already running"
        app = create_app(self.settings, list(self.settings.nats_url))
        await app.start()
        self.app = app
        return app

    async def stop(self) -> None:
        app, self.app = self.app, None
        if app is not None:
            await app.stop()


@pytest.fixture
async def ingest_service(settings: Settings, js: JetStreamContext) -> AsyncIterator[Ingest]:
    """An ingest service that is NOT started yet (topology is applied by ``js``)."""
    service = Ingest(settings)
    yield service
    await service.stop()


@pytest.fixture
async def ingest(ingest_service: Ingest) -> Ingest:
    await ingest_service.start()
    return ingest_service


async def count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def stored(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    """Every message currently in ``stream``, in stream order."""
    state = (await js.stream_info(stream)).state
    out: list[RawStreamMsg] = []
    if not state.messages:
        return out
    for seq in range(state.first_seq, state.last_seq + 1):
        try:
            out.append(await js.get_msg(stream, seq))
        except NotFoundError:
            continue
    return out


def payload(msg: RawStreamMsg) -> dict[str, Any]:
    """The alert a stored message carries (every message in ALERTS has a body)."""
    assert msg.data is not None, f"seq {msg.seq} has no payload"
    body: dict[str, Any] = orjson.loads(msg.data)
    return body


async def wait_count(js: JetStreamContext, stream: str, n: int, within: float = DEADLINE) -> None:
    async def reached() -> bool:
        return await count(js, stream) >= n

    await eventually(reached, within, f"{n} message(s) in {stream}")
    assert await count(js, stream) == n, f"{stream} holds more than {n}"


async def wait_drained(js: JetStreamContext, names: Names, captured: int) -> None:
    """INGEST has captured ``captured`` events in all and holds none of them any more."""

    async def drained() -> bool:
        state = (await js.stream_info(names.ingest_stream)).state
        return state.last_seq >= captured and state.messages == 0

    await eventually(drained, DEADLINE, f"INGEST to capture {captured} and drain")


async def publish_event(
    nc: NatsClient, names: Names, raw: bytes, headers: dict[str, str] | None = None
) -> None:
    """As the engine does: core NATS, no JetStream ack (capture is JetStream's job)."""
    await nc.publish(names.ingest_subject, raw, headers=headers)
    await nc.flush()


def subject_of(names: Names, country: str, region: str, level: str, kind: str) -> str:
    # Spelled out here rather than taken from Names.alert_subject: this is the contract.
    return f"{names.namespace}.alerts.{country}.{region}.{level}.{kind}"


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- 1. a valid event reaches ALERTS ----------------------------------------------------
@pytest.mark.parametrize("alert_id", [None, "ke-2026.0042:b"], ids=["int-id", "str-id"])
async def test_valid_event_lands_in_alerts_and_ingest_drains(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names, alert_id: str | None
) -> None:
    body = alert("KE-30", alert_level="critical", alert_type="system_health")
    if alert_id is not None:
        body["alert_id"] = alert_id
    await publish_event(nc, names, orjson.dumps(body))

    await wait_count(js, names.alerts_stream, 1)
    [msg] = await stored(js, names.alerts_stream)
    assert msg.subject == subject_of(names, "KE", "KE-30", "critical", "system_health")
    assert msg.headers is not None
    assert msg.headers["Nats-Msg-Id"] == str(body["alert_id"])
    assert "Nats-TTL" not in msg.headers and "Tocsin-Expires" not in msg.headers
    kept = payload(msg)
    assert {k: kept[k] for k in body} == body  # plus defaults filled in (priority, ...)
    assert Alert.model_validate(kept) == Alert.model_validate(body)
    await wait_drained(js, names, 1)
    assert await count(js, names.dlq_stream) == 0


async def test_country_wide_alert_subject_repeats_country(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    body = alert("UG", alert_level="emergency")
    await publish_event(nc, names, orjson.dumps(body))
    await wait_count(js, names.alerts_stream, 1)
    [msg] = await stored(js, names.alerts_stream)
    assert msg.subject == subject_of(names, "UG", "UG", "emergency", "outbreak_risk")
    await wait_drained(js, names, 1)


# --- 2. nothing is lost while the service is down ---------------------------------------
async def test_events_published_while_down_are_processed_on_start(
    ingest_service: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    bodies = [alert(f"KE-{i}") for i in range(1, 21)]
    for body in bodies:
        await nc.publish(names.ingest_subject, orjson.dumps(body))
    await nc.flush()
    await wait_count(js, names.ingest_stream, 20)  # captured, waiting for the service
    assert await count(js, names.alerts_stream) == 0

    await ingest_service.start()
    await wait_count(js, names.alerts_stream, 20)  # within its deadline: no timed assert

    msgs = await stored(js, names.alerts_stream)
    assert sorted(payload(m)["alert_id"] for m in msgs) == sorted(b["alert_id"] for b in bodies)
    assert {m.headers["Nats-Msg-Id"] for m in msgs if m.headers} == {
        str(b["alert_id"]) for b in bodies
    }
    await wait_drained(js, names, 20)


async def test_an_older_ingest_durable_gets_the_current_ack_wait(
    ingest_service: Ingest, js: JetStreamContext, names: Names
) -> None:
    """faststream never updates an existing durable: one made by an older version with a
    30 s ack_wait is brought to the current value at start, keeping its position."""
    from nats.js.api import AckPolicy as JsAckPolicy
    from nats.js.api import ConsumerConfig

    from tocsin.ingest.app import INGEST_ACK_WAIT

    await js.add_consumer(
        names.ingest_stream,
        ConsumerConfig(
            durable_name=names.ingest_consumer,
            ack_policy=JsAckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=1024,
            filter_subject=names.ingest_subject,
        ),
    )
    await ingest_service.start()
    info = await js.consumer_info(names.ingest_stream, names.ingest_consumer)
    assert info.config.ack_wait == INGEST_ACK_WAIT


async def test_restart_resumes_without_loss_or_duplicates(
    ingest_service: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    await ingest_service.start()
    first = [alert() for _ in range(5)]
    for body in first:
        await nc.publish(names.ingest_subject, orjson.dumps(body))
    await nc.flush()
    await wait_count(js, names.alerts_stream, 5)
    await wait_drained(js, names, 5)

    await ingest_service.stop()
    second = [alert() for _ in range(5)]
    for body in second:
        await nc.publish(names.ingest_subject, orjson.dumps(body))
    await nc.flush()
    await wait_count(js, names.ingest_stream, 5)  # held while down

    await ingest_service.start()  # same durable consumer, a fresh process-like app
    await wait_count(js, names.alerts_stream, 10)
    await wait_drained(js, names, 10)
    ids = [payload(m)["alert_id"] for m in await stored(js, names.alerts_stream)]
    assert sorted(ids) == sorted(b["alert_id"] for b in first + second)


# --- 3. invalid events go to the DLQ, byte for byte -------------------------------------
def _pretty(body: dict[str, Any]) -> bytes:
    """Not the canonical form, so that a re-encoding would show in the DLQ copy."""
    return json.dumps(body, indent=3, sort_keys=True).encode() + b"\n"


def _missing_region() -> bytes:
    return _pretty(alert(location={"lat": -0.09, "lon": 34.77}))


def _expired() -> bytes:
    return _pretty(alert(expiry_time=iso(datetime.now(UTC) - timedelta(minutes=5))))


def _too_large() -> bytes:
    body = orjson.dumps(alert())
    return body[:-1] + b" " * (64 * 1024) + b"}"  # valid JSON, over the 64 KiB limit


INVALID: dict[str, tuple[Callable[[], bytes], str, str]] = {
    "not-json": (lambda: b"alert 7, no JSON", "invalid_json", ""),
    # XML on ingest.alerts is read as CAP (detected by content): not CAP, it says so.
    "not-cap": (lambda: b"<alert><id>7</id></alert>", "invalid_cap", ""),
    "not-object": (lambda: b"[1, 2, 3]", "invalid_json", ""),
    "unknown-field": (lambda: _pretty(alert(severity="bad")), "invalid_alert", "severity"),
    "missing-region": (_missing_region, "invalid_alert", "location.region"),
    "unknown-type": (lambda: _pretty(alert(alert_type="earthquake")), "unknown_type", "alert_type"),
    "expired": (_expired, "expired", "expiry_time"),
    "too-large": (_too_large, "too_large", ""),
}


@pytest.mark.parametrize("case", list(INVALID))
async def test_invalid_event_is_dead_lettered_unchanged(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names, case: str
) -> None:
    make, reason, field = INVALID[case]
    raw = make()
    await publish_event(nc, names, raw, headers={"Engine-Trace": f"trace-{case}"})

    await wait_count(js, names.dlq_stream, 1)
    [dead] = await stored(js, names.dlq_stream)
    assert dead.subject == f"{names.namespace}.ingest.dlq.{reason}"
    assert dead.data == raw  # the original bytes, unchanged
    assert dead.headers is not None
    assert dead.headers["Tocsin-Reason"] == reason
    errors = orjson.loads(dead.headers["Tocsin-Errors"])
    assert errors and all(set(e) == {"field", "message"} for e in errors)
    assert field in [e["field"] for e in errors], errors
    assert all(e["message"] for e in errors)
    assert dead.headers["Engine-Trace"] == f"trace-{case}"  # the engine's headers are kept
    assert "Nats-Msg-Id" not in dead.headers

    await wait_drained(js, names, 1)
    assert await count(js, names.alerts_stream) == 0  # never reaches ALERTS


async def test_mixed_batch_only_valid_events_reach_alerts(
    ingest_service: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    valid = [alert() for _ in range(3)]
    events = [make() for make, _, _ in INVALID.values()] + [orjson.dumps(b) for b in valid]
    for raw in events:
        await nc.publish(names.ingest_subject, raw)
    await nc.flush()
    await ingest_service.start()

    await wait_count(js, names.dlq_stream, len(INVALID))
    await wait_count(js, names.alerts_stream, len(valid))
    await wait_drained(js, names, len(events))
    ids = {payload(m)["alert_id"] for m in await stored(js, names.alerts_stream)}
    assert ids == {b["alert_id"] for b in valid}
    reasons = sorted(
        m.headers["Tocsin-Reason"] for m in await stored(js, names.dlq_stream) if m.headers
    )
    assert reasons == sorted(r for _, r, _ in INVALID.values())


async def wait_dead_letter(js: JetStreamContext, names: Names) -> None:
    """One dead letter; on a timeout, say what the ingest consumer is doing instead."""
    try:
        await wait_count(js, names.dlq_stream, 1)
    except AssertionError as exc:
        info = await js.consumer_info(names.ingest_stream, names.ingest_consumer)
        raise AssertionError(
            f"{exc}; INGEST still holds {await count(js, names.ingest_stream)}; the ingest "
            f"consumer made {info.delivered.consumer_seq} deliveries of "
            f"{info.delivered.stream_seq} captured event(s)"
        ) from None


async def test_event_published_with_jetstream_and_expected_stream_is_processed(
    ingest: Ingest, js: JetStreamContext, names: Names
) -> None:
    """An engine may publish with JetStream for an ack: ``js.publish(..., stream="INGEST")``."""
    body = alert()
    ack = await js.publish(names.ingest_subject, orjson.dumps(body), stream=names.ingest_stream)
    assert ack.stream == names.ingest_stream
    await wait_count(js, names.alerts_stream, 1)
    await wait_drained(js, names, 1)


async def test_invalid_event_published_with_expected_stream_header_is_dead_lettered(
    ingest: Ingest, js: JetStreamContext, names: Names
) -> None:
    """The event's ``Nats-Expected-Stream: INGEST`` header must not follow it into the DLQ.

    dead_letter() copies the event's headers onto its publish to INGEST_DLQ; JetStream
    then refuses that publish (10060 expected stream does not match), the handler nacks,
    and the event is redelivered forever: never dead-lettered, INGEST never drains.
    """
    raw = b"{not json"
    await js.publish(names.ingest_subject, raw, stream=names.ingest_stream)
    await wait_dead_letter(js, names)
    [dead] = await stored(js, names.dlq_stream)
    assert dead.data == raw
    assert dead.headers is not None and dead.headers["Tocsin-Reason"] == "invalid_json"
    await wait_drained(js, names, 1)


async def test_event_over_ingest_message_limit_is_not_silently_dropped(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    """CONTRACT §5: invalid events land in INGEST_DLQ, never silently dropped.

    An event of 200 KiB (under the server's 1 MiB max_payload, so core NATS accepts it
    without an error) is over INGEST's max_msg_size (2 x 64 KiB): JetStream does not
    capture it, the engine is told nothing (core publish), and no dead letter exists.
    """
    raw = _too_large()[:-1] + b" " * (200 * 1024) + b"}"
    assert len(raw) < nc.max_payload
    sentinel = alert()
    await nc.publish(names.ingest_subject, raw)
    await nc.publish(names.ingest_subject, orjson.dumps(sentinel))
    await nc.flush()
    await wait_count(js, names.alerts_stream, 1)  # the event after it went through
    await wait_dead_letter(js, names)
    [dead] = await stored(js, names.dlq_stream)
    assert dead.headers is not None and dead.headers["Tocsin-Reason"] == "too_large"
    assert dead.data == raw


# --- 4. one alert_id, one stored alert --------------------------------------------------
async def test_same_alert_id_twice_over_nats_and_once_over_http_is_stored_once(
    ingest: Ingest,
    gateway: RunningGateway,
    nc: NatsClient,
    js: JetStreamContext,
    names: Names,
) -> None:
    body = alert("KE-30")
    raw = orjson.dumps(body)
    await nc.publish(names.ingest_subject, raw)
    await nc.publish(names.ingest_subject, raw)
    await nc.flush()
    await wait_drained(js, names, 2)  # both captured and both handled
    await wait_count(js, names.alerts_stream, 1)
    [msg] = await stored(js, names.alerts_stream)

    tok = token("engine", ("KE",), roles=("publisher",))
    async with aiohttp.ClientSession() as http:
        resp = await http.post(
            f"{gateway.http}/api/v1/alerts", json=body, headers={"Authorization": f"Bearer {tok}"}
        )
        assert resp.status == 202, await resp.text()
        assert await resp.json() == {
            "alert_id": body["alert_id"],
            "seq": msg.seq,
            "duplicate": True,
        }

        # The other order: HTTP first, then the engine repeats it twice.
        other = alert("KE-31")
        resp = await http.post(
            f"{gateway.http}/api/v1/alerts", json=other, headers={"Authorization": f"Bearer {tok}"}
        )
        assert resp.status == 202, await resp.text()
        first = await resp.json()
        assert first["duplicate"] is False
    for _ in range(2):
        await nc.publish(names.ingest_subject, orjson.dumps(other))
    await nc.flush()
    await wait_drained(js, names, 4)

    msgs = await stored(js, names.alerts_stream)
    assert [payload(m)["alert_id"] for m in msgs] == [body["alert_id"], other["alert_id"]]
    assert msgs[1].seq == first["seq"]
    assert await count(js, names.dlq_stream) == 0


# --- 5. expiry travels as headers -------------------------------------------------------
async def test_expiring_alert_carries_ttl_and_expires_headers(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    expires = datetime.now(UTC).replace(microsecond=250_000) + timedelta(seconds=90)
    body = alert("KE-30", expiry_time=iso(expires))
    published = time.time()
    await publish_event(nc, names, orjson.dumps(body))

    await wait_count(js, names.alerts_stream, 1)
    [msg] = await stored(js, names.alerts_stream)
    assert msg.headers is not None
    ttl = msg.headers["Nats-TTL"]
    assert ttl.isdigit(), ttl  # whole seconds, no unit
    remaining = expires.timestamp() - published
    assert 1 <= int(ttl) and math.floor(remaining) - 5 <= int(ttl) <= math.ceil(remaining)
    assert float(msg.headers["Tocsin-Expires"]) == pytest.approx(expires.timestamp(), abs=1e-3)
    assert msg.headers["Nats-Msg-Id"] == str(body["alert_id"])
    stored_expiry = datetime.fromisoformat(payload(msg)["expiry_time"])
    assert stored_expiry == expires
    await wait_drained(js, names, 1)


@pytest.mark.parametrize(
    ("remaining", "expected"),
    [(30.2, "31"), (1.0, "1"), (0.2, "1"), (-3.0, "1")],
    ids=["rounds-up", "exact", "under-a-second", "already-past-by-now"],
)
async def test_ttl_is_whole_seconds_rounded_up_and_at_least_one(
    js: JetStreamContext, names: Names, remaining: float, expected: str
) -> None:
    """append_alert against the real stream: the server accepts every TTL it is given."""
    expires = datetime.now(UTC) + timedelta(hours=1)
    model = Alert.model_validate(alert(expiry_time=iso(expires)))
    # Watch from before the append: a 1 s TTL may remove the message before a read.
    sub = await js.subscribe(names.alerts_all, stream=names.alerts_stream)
    try:
        ack = await append_alert(js, names, model, now=expires.timestamp() - remaining)
        msg = await sub.next_msg(timeout=DEADLINE)
    finally:
        await sub.unsubscribe()
    assert msg.metadata.sequence.stream == ack.seq
    assert msg.headers is not None
    assert msg.headers["Nats-TTL"] == expected
    assert float(msg.headers["Tocsin-Expires"]) == pytest.approx(expires.timestamp(), abs=1e-3)


async def test_short_lived_alert_is_removed_from_alerts_by_its_ttl(
    ingest: Ingest, nc: NatsClient, js: JetStreamContext, names: Names
) -> None:
    body = alert("KE-30", expiry_time=iso(datetime.now(UTC) + timedelta(seconds=2)))
    sub = await js.subscribe(names.alerts_all, stream=names.alerts_stream)
    try:
        await publish_event(nc, names, orjson.dumps(body))
        msg = await sub.next_msg(timeout=DEADLINE)
    finally:
        await sub.unsubscribe()
    assert msg.headers is not None and msg.headers["Nats-TTL"] in {"1", "2"}
    assert orjson.loads(msg.data)["alert_id"] == body["alert_id"]

    async def gone() -> bool:
        return await count(js, names.alerts_stream) == 0

    await eventually(gone, DEADLINE, "the server to remove the alert at its TTL")
    await wait_drained(js, names, 1)
    assert await count(js, names.dlq_stream) == 0


async def test_the_ingest_service_serves_exact_counters_on_its_metrics_port(
    make_settings: Callable[..., Settings], js: JetStreamContext, nc: NatsClient, names: Names
) -> None:
    from tocsin.core.supervisor import free_port

    from ..gateway.test_metrics import parse_exposition, value

    port = free_port()
    service = Ingest(make_settings(ingest_metrics_port=port))
    await service.start()
    try:
        body = alert()
        for raw in (orjson.dumps(body), orjson.dumps(body), orjson.dumps(alert()), b"{not json"):
            await publish_event(nc, names, raw)

        async def scraped() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 200
                    return parse_exposition(await resp.text())

        async def all_counted() -> bool:
            f = await scraped()
            done = value(f, "tocsin_ingest_alerts_accepted_total")
            done += value(f, "tocsin_ingest_duplicates_total")
            return (
                done + value(f, "tocsin_ingest_alerts_rejected_total", reason="invalid_json") == 4
            )

        await eventually(all_counted, what="four events counted")
        families = await scraped()
        assert value(families, "tocsin_ingest_alerts_accepted_total") == 2
        assert value(families, "tocsin_ingest_duplicates_total") == 1
        assert value(families, "tocsin_ingest_alerts_rejected_total", reason="invalid_json") == 1
        assert value(families, "tocsin_ingest_alerts_rejected_total", reason="expired") == 0
        assert value(families, "tocsin_ingest_nats_connected") == 1
        assert "process_resident_memory_bytes" in families
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200 and (await resp.json())["nats_connected"] is True
    finally:
        await service.stop()
