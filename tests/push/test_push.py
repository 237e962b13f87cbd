"""Push notifications end to end (issue 13): real nats-server, gateway, notifier, token
endpoint and recording push endpoint. "None" is never a timeout: each waits for a positive
sign that the notifier decided (a skip counted, or a later alert pushed)."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tocsin.bench.pushsink import PushSink
from tocsin.cli.status import collect
from tocsin.core.naming import Names
from tocsin.gateway.journal import Journal
from tocsin.gateway.push import PushRegistrations
from tocsin.gateway.records import DeviceRecords
from tocsin.ingest.pipeline import store_alert
from tocsin.notifier.app import app_notifiers, create_app
from tocsin.schemas import Alert

from ..support import Client, append, eventually, start_gateway, token
from ..support import alert as alert_body
from .conftest import Stack

pytestmark = pytest.mark.timeout(90)


def high(alert_id: int, region: str = "KE-30", **kw: Any) -> dict[str, Any]:
    return alert_body(region, alert_id=alert_id, **kw)


async def dlq(js: JetStreamContext, names: Names) -> list[Any]:
    info = await js.stream_info(names.push_dlq_stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            out.append(await js.get_msg(names.push_dlq_stream, seq))
        except NotFoundError:
            continue
    return out


async def test_one_push_per_offline_device_in_the_fcm_v1_shape(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    tokens = [f"fcm-{i}" for i in range(3)]
    for i, fcm_token in enumerate(tokens):
        await stack.offline_device(f"user{i}", fcm_token)
    expires = "2099-01-01T00:00:00Z"
    ack = await append(js, names, high(7001, expiry_time=expires, action_url="https://x.org/a"))
    await eventually(
        lambda: all(stack.endpoints.accepted_for(t) for t in tokens), 15, "a push to each device"
    )
    second = await append(js, names, high(7002))
    await eventually(
        lambda: all(len(stack.endpoints.accepted_for(t)) == 2 for t in tokens), 15, "second"
    )
    for fcm_token in tokens:
        got = stack.endpoints.requests_for(fcm_token)
        assert [p.alert_id for p in got] == ["7001", "7002"]  # one each, no repeat
    body = stack.endpoints.requests_for("fcm-0")[0].body["message"]
    assert body["token"] == "fcm-0"
    assert body["notification"]["title"]
    data = body["data"]
    assert data["alert_id"] == "7001" and data["seq"] == str(ack.seq) and data["level"] == "high"
    assert data["action_url"] == "https://x.org/a" and data["expiry_time"] == expires
    assert all(isinstance(v, str) for v in data.values())
    assert body["android"]["priority"] == "high"
    assert body["android"]["collapse_key"] == "alert-7001"
    assert body["android"]["ttl"].endswith("s") and int(body["android"]["ttl"][:-1]) > 10**8
    headers = body["apns"]["headers"]
    assert headers["apns-priority"] == "10" and headers["apns-collapse-id"] == "alert-7001"
    assert headers["apns-expiration"] == str(4070908800)
    # One OAuth2 token minted from the service account's token_uri, used for every push.
    assert stack.endpoints.minted == ["access-1"]
    assert {p.authorization for p in stack.endpoints.pushes} == {"Bearer access-1"}
    # the endpoint records a push before the notifier has read its answer
    await eventually(lambda: stack.notifier.counters.sent == 6, 10, "every answer read")
    assert second.seq > ack.seq


async def test_no_push_below_the_level_off_the_subscription_or_already_received(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    counters = stack.notifier.counters
    await stack.offline_device("kenya", "fcm-all")
    await stack.offline_device("homa", "fcm-ke30", groups=["region:KE-30"])
    await stack.offline_device("uganda-only", "fcm-ug", groups=["region:KE-30"])
    # Below TOCSIN_PUSH_MIN_LEVEL (high): judged at once, never pushed.
    await append(js, names, alert_body("KE-31", alert_id=8001, alert_level="medium"))
    await eventually(lambda: counters.skipped["below_level"] >= 1, 10, "the low alert judged")
    # KE-31: selected by "kenya" (no groups), not by the KE-30 subscribers.
    await append(js, names, high(8002, region="KE-31"))
    await eventually(lambda: bool(stack.endpoints.accepted_for("fcm-all")), 15, "pushed to kenya")
    await eventually(lambda: counters.skipped["not_subscribed"] >= 2, 10, "the others judged")
    assert not stack.endpoints.requests_for("fcm-ke30")
    assert not stack.endpoints.requests_for("fcm-ug")

    # A device that comes back and receives the alert over its socket before the push is
    # due gets no push for it.
    client = await Client.connect(stack.gateway.ws_url, token("homa"), client_id="phone")
    await client.next("connection_established")
    await append(js, names, high(8003))
    [frame] = await client.alerts(1, ack=True)
    assert frame["alert"]["alert_id"] == 8003
    await client.close()  # the release records the acked floor
    await eventually(
        lambda: [p.alert_id for p in stack.endpoints.accepted_for("fcm-all")][-1:] == ["8003"],
        15,
        "8003 to kenya",
    )
    await eventually(lambda: counters.skipped["received"] >= 1, 10, "homa's push judged")
    assert not stack.endpoints.requests_for("fcm-ke30")


async def test_a_connected_device_that_acks_gets_no_push(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    counters = stack.notifier.counters
    await stack.offline_device("online", "fcm-online")
    await stack.offline_device("away", "fcm-away")
    client = await Client.connect(stack.gateway.ws_url, token("online"), client_id="phone")
    await client.next("connection_established")
    await append(js, names, high(8101))
    await client.alerts(1, ack=True)  # acked on a live connection: a checkpoint saves it
    await eventually(lambda: bool(stack.endpoints.accepted_for("fcm-away")), 15, "pushed to away")
    await eventually(lambda: counters.skipped["received"] >= 1, 10, "online judged")
    assert not stack.endpoints.requests_for("fcm-online")
    await client.close()


async def test_an_expired_alert_is_never_pushed(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    await stack.offline_device("kenya", "fcm-all")
    soon = time.time() + 0.5
    expiring = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(soon)) + f".{int(soon % 1 * 1000):03d}Z"
    )
    gone = await append(js, names, high(8201, expiry_time=expiring))
    await append(js, names, high(8202))
    await eventually(lambda: bool(stack.endpoints.accepted_for("fcm-all")), 15, "the later alert")
    assert [p.alert_id for p in stack.endpoints.requests_for("fcm-all")] == ["8202"]

    async def decided() -> bool:  # judged expired, or gone from ALERTS: it cannot come back
        if stack.notifier.counters.skipped["expired"]:
            return True
        try:
            await js.get_msg(names.alerts_stream, gone.seq)
        except NotFoundError:
            return True
        return False

    await eventually(decided, 10, "the expired alert decided")
    assert [p.alert_id for p in stack.endpoints.requests_for("fcm-all")] == ["8202"]


async def test_a_superseded_alert_is_never_pushed_its_cancel_is(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    """A cancel stored (by the ingest path, which indexes it) before the alert's push is due:
    the device is pushed the cancel only (CAP supersede, issue 14)."""
    await stack.offline_device("kenya", "fcm-all")
    await store_alert(js, names, Alert.model_validate(high(8301)))
    await store_alert(
        js, names, Alert.model_validate(high(8302, msg_type="cancel", references=[8301]))
    )
    await eventually(lambda: bool(stack.endpoints.accepted_for("fcm-all")), 15, "the cancel")
    await eventually(
        lambda: stack.notifier.counters.skipped["superseded"] >= 1, 10, "the alert judged"
    )
    [push] = stack.endpoints.requests_for("fcm-all")
    assert push.alert_id == "8302"
    message = push.body["message"]
    assert message["data"]["msg_type"] == "cancel" and message["data"]["references"] == "8301"
    # it replaces a notification of the alert it cancels on the phone
    assert message["android"]["collapse_key"] == "alert-8301"
    assert message["apns"]["headers"]["apns-collapse-id"] == "alert-8301"


async def test_failures_are_retried_with_growing_delays_then_dead_lettered(
    stack: Stack, js: JetStreamContext, names: Names, nc: NatsClient
) -> None:
    e = stack.endpoints
    await stack.offline_device("flaky", "fcm-flaky")
    await stack.offline_device("busy", "fcm-busy")
    await stack.offline_device("broken", "fcm-broken")
    await stack.offline_device("bad", "fcm-bad")
    e.fail("fcm-flaky", 503, 500)  # then 200
    e.fail("fcm-busy", 429, retry_after="2")  # then 200
    e.fail("fcm-broken", 503, 503, 503)  # three attempts: all fail
    e.fail("fcm-bad", 400)  # not retried
    await append(js, names, high(8301))
    await eventually(
        lambda: bool(e.accepted_for("fcm-flaky") and e.accepted_for("fcm-busy")), 30, "ok"
    )
    await eventually(lambda: len(e.requests_for("fcm-broken")) == 3, 30, "three attempts")

    async def dead() -> list[Any]:
        return [m for m in await dlq(js, names)]

    await eventually(lambda: stack.notifier.counters.dead_lettered.total() >= 2, 20, "DLQ")
    flaky = [p.at for p in e.requests_for("fcm-flaky")]
    assert len(flaky) == 3
    assert flaky[2] - flaky[1] >= flaky[1] - flaky[0] > 0.1  # backoff 0.3: 0.15-0.3, then 0.3-0.6
    busy = [p.at for p in e.requests_for("fcm-busy")]
    assert len(busy) == 2 and busy[1] - busy[0] >= 1.9  # Retry-After: 2
    broken = [p.at for p in e.requests_for("fcm-broken")]
    assert broken[2] - broken[1] >= broken[1] - broken[0]
    assert len(e.requests_for("fcm-bad")) == 1
    letters = {m.subject.rsplit(".", 1)[1]: m for m in await dead()}
    assert set(letters) == {"exhausted", "rejected"}
    exhausted = letters["exhausted"]
    assert exhausted.headers["Tocsin-Reason"] == "http_503"
    assert orjson.loads(exhausted.data)["attempts"] == 3
    assert orjson.loads(exhausted.data)["consumer"] == names.device_consumer("broken", "phone")
    assert letters["rejected"].headers["Tocsin-Reason"] == "http_400"
    counters = stack.notifier.counters
    assert counters.retried >= 5 and counters.failed["http_503"] >= 4
    assert e.accepted_for("fcm-flaky") and len(e.accepted_for("fcm-flaky")) == 1
    # tocsin status: the registrations and the push DLQ
    doc = await collect(nc, names, wait=0.2)
    assert doc["push"]["registrations"] == 4
    assert doc["push"]["dlq"]["by_kind"] == {"exhausted": 1, "rejected": 1}
    assert any("push(es) dead-lettered" in w for w in doc["warnings"])


async def test_unregistered_drops_the_registration(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    e = stack.endpoints
    await stack.offline_device("gone", "fcm-gone")
    await stack.offline_device("kenya", "fcm-all")
    e.fail("fcm-gone", 404)
    await append(js, names, high(8401))
    await eventually(lambda: stack.notifier.counters.dropped == 1, 15, "the registration dropped")
    _, reg = await PushRegistrations(js, names).read("gone", "phone")
    assert reg is None
    await append(js, names, high(8402))
    await eventually(lambda: len(e.accepted_for("fcm-all")) == 2, 15, "both to kenya")
    assert len(e.requests_for("fcm-gone")) == 1  # 404 is not retried, and no more pushes


async def test_registration_survives_a_gateway_restart_and_rotation_replaces_it(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    await stack.offline_device("rotating", "fcm-old")
    await stack.gateway.stop()
    stack.gateway = await start_gateway(stack.settings)
    await append(js, names, high(8501))
    await eventually(
        lambda: bool(stack.endpoints.accepted_for("fcm-old")), 15, "pushed after restart"
    )
    # The app's FCM token rotated: it registers the new one (over HTTP, in the background).
    assert await stack.register_http("rotating", "phone", "fcm-new") == 200
    await eventually(
        lambda: (
            stack.notifier.view is not None
            and stack.notifier.view.registrations[names.device_consumer("rotating", "phone")][
                1
            ].token
            == "fcm-new"
        ),
        10,
        "the notifier sees the new token",
    )
    await append(js, names, high(8502))
    await eventually(
        lambda: bool(stack.endpoints.accepted_for("fcm-new")), 15, "pushed to the new token"
    )
    assert [p.alert_id for p in stack.endpoints.requests_for("fcm-old")] == ["8501"]
    assert [p.alert_id for p in stack.endpoints.requests_for("fcm-new")] == ["8502"]


async def test_http_registration_checks_token_and_body(stack: Stack) -> None:
    assert await stack.register_http("alice", "phone", "fcm-a") == 200
    import aiohttp

    async with aiohttp.ClientSession() as http:
        url = f"{stack.gateway.http}/api/v1/devices/phone/push"
        async with http.put(url, json={"provider": "fcm", "token": "x"}) as resp:
            assert resp.status == 401
        auth = {"Authorization": f"Bearer {token('alice')}"}
        async with http.put(url, json={"provider": "apns", "token": "x"}, headers=auth) as resp:
            assert resp.status == 422
            assert (await resp.json())["detail"].startswith("provider")
        async with http.delete(url, headers=auth) as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"type": "push_unregistered", "client_id": "phone"}


async def test_a_device_connected_when_its_push_is_due_is_pushed_once_it_leaves_unacked(
    stack: Stack, js: JetStreamContext, names: Names
) -> None:
    counters = stack.notifier.counters
    await stack.offline_device("late", "fcm-late")
    client = await Client.connect(stack.gateway.ws_url, token("late"), client_id="phone")
    await client.next("connection_established")
    await append(js, names, high(8601))
    await client.alerts(1, ack=False)  # sent, never acked: not received
    await eventually(lambda: counters.deferred >= 2, 15, "the push deferred while connected")
    assert not stack.endpoints.requests_for("fcm-late")
    await client.close()  # leaves without acking: the push goes out
    await eventually(lambda: bool(stack.endpoints.accepted_for("fcm-late")), 15, "pushed")
    assert [p.alert_id for p in stack.endpoints.requests_for("fcm-late")] == ["8601"]


async def test_the_bearer_is_refreshed_before_it_expires(
    push_settings: Any, endpoints: PushSink, js: JetStreamContext, names: Names
) -> None:
    # Tokens good for 300 s: within the 300 s margin at once, so each push mints a new one
    # before it is used (a token is never sent close to its expiry).
    endpoints.expires_in = 300
    settings = push_settings()
    stack = Stack(settings, endpoints, await start_gateway(settings))
    await stack.start_notifier()
    try:
        await stack.offline_device("a", "fcm-r")
        await append(js, names, high(8701))
        await eventually(lambda: len(endpoints.accepted_for("fcm-r")) == 1, 15, "first")
        await append(js, names, high(8702))
        await eventually(lambda: len(endpoints.accepted_for("fcm-r")) == 2, 15, "second")
        first, second = endpoints.requests_for("fcm-r")
        assert first.authorization != second.authorization
        assert second.authorization == f"Bearer {endpoints.minted[-1]}"
        assert stack.notifier.bearer is not None and stack.notifier.bearer.refreshes >= 2
    finally:
        await stack.stop_notifier()
        await stack.gateway.stop()


async def test_a_slow_endpoint_times_out_and_is_retried_within_bounded_concurrency(
    push_settings: Any, endpoints: PushSink, js: JetStreamContext, names: Names
) -> None:
    settings = push_settings(push_concurrency=4, push_timeout_seconds=0.5)
    stack = Stack(settings, endpoints, await start_gateway(settings))
    await stack.start_notifier()
    try:
        devices = [f"fcm-s{i}" for i in range(12)]
        for i, fcm_token in enumerate(devices):
            await stack.offline_device(f"s{i}", fcm_token)
        endpoints.delay = 1.0  # slower than the timeout: every first attempt times out
        await append(js, names, high(8801))
        await eventually(lambda: stack.notifier.counters.failed["timeout"] >= 4, 20, "timeouts")
        endpoints.delay = 0.0
        counters = stack.notifier.counters
        await eventually(lambda: counters.sent == len(devices), 30, "every push answered 200")
        retried = [t for t in devices if len(endpoints.requests_for(t)) >= 2]
        assert len(retried) >= 4 and counters.retried >= 4
        # Requests the notifier gave up on may still be open at the endpoint: measure the
        # bound on a second alert, answered slowly but within the timeout.
        await eventually(lambda: endpoints.in_flight == 0, 10, "abandoned requests ended")
        endpoints.delay, endpoints.max_in_flight = 0.2, 0
        await append(js, names, high(8802))
        await eventually(lambda: counters.sent == 2 * len(devices), 30, "the second alert")
        assert 2 <= endpoints.max_in_flight <= 4  # TOCSIN_PUSH_CONCURRENCY bounds it
        for fcm_token in devices:
            got = endpoints.requests_for(fcm_token)
            # A timed-out request may have been taken by the endpoint: the retry carries
            # the same collapse key, so the phone shows one notification.
            keys = {p.body["message"]["apns"]["headers"]["apns-collapse-id"] for p in got}
            assert keys == {"alert-8801", "alert-8802"}
            assert [p.alert_id for p in endpoints.accepted_for(fcm_token)][-1] == "8802"
    finally:
        await stack.stop_notifier()
        await stack.gateway.stop()


async def test_a_device_whose_gateway_was_killed_is_pushed_what_it_had_not_acked(
    push_settings: Any,
    endpoints: PushSink,
    js: JetStreamContext,
    names: Names,
    gateway_process: Any,
) -> None:
    """Its record still names an owner, but the owner's gateway has no lease any more: the
    device is offline, and what its gateway last saved of its acks (the queue's ack floor,
    or the gateway's positions journal, written every checkpoint) says what it had."""
    settings = push_settings()
    gateway = gateway_process(settings)
    app = create_app(settings, list(settings.nats_url))
    await app.start()
    notifier = app_notifiers[app]
    try:
        client = await Client.connect(gateway.ws_url, token("crash"), client_id="phone")
        await client.next("connection_established")
        await client.send({"type": "register_push", "provider": "fcm", "token": "fcm-crash"})
        await client.next("push_registered")
        await append(js, names, high(8901))
        await client.alerts(1, ack=True)  # acked; a checkpoint (0.2 s) saves it
        consumer = names.device_consumer("crash", "phone")

        journal = Journal(js, names, "test")

        async def checkpointed() -> bool:
            info = await js.consumer_info(names.alerts_stream, consumer)
            if info.ack_floor and info.ack_floor.stream_seq >= 1:
                return True
            _, record = await DeviceRecords(js, names).read(consumer)
            if record is None or not record.gateway:
                return False
            journaled = await journal.read(record.gateway, consumer)
            return journaled is not None and journaled.floor >= 1

        await eventually(checkpointed, 10, "the ack checkpointed")
        gateway.kill()  # kill -9: the record keeps its owner
        await client.wait_closed()
        await append(js, names, high(8902))
        await eventually(lambda: notifier.counters.deferred >= 1, 15, "deferred first")
        # The lease lapses within 15 s; then the push goes out, for 8902 only.
        await eventually(lambda: bool(endpoints.accepted_for("fcm-crash")), 40, "pushed")
        await eventually(lambda: notifier.counters.skipped["received"] >= 1, 10, "8901")
        assert [p.alert_id for p in endpoints.requests_for("fcm-crash")] == ["8902"]
        await client.session.close()
    finally:
        await app.stop()
