"""Subscriptions over a real socket: answers, narrowing on every path, persistence, races.

Negative checks use order instead of waiting: a device receives its alerts in publish order,
so when the alert it should skip is published first and a matching sentinel last, the
first alert it receives must be the sentinel.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import orjson
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import Client, RunningGateway, alert, append, eventually, start_gateway, token


async def ask(client: Client, frame: dict[str, Any]) -> dict[str, Any]:
    await client.send(frame)
    return await client.next("subscription_response")


async def first_alert_id(client: Client) -> Any:
    return (await client.next("alert"))["alert"]["alert_id"]


async def skipped_then(
    js: JetStream, names: Names, client: Client, skip: list[dict[str, Any]], want: dict[str, Any]
) -> None:
    """Publish ``skip`` then ``want``: ``want`` must be the next alert the client gets."""
    for body in skip:
        await append(js, names, body)
    await append(js, names, want)
    assert await first_alert_id(client) == want["alert_id"]


JetStream = JetStreamContext


async def test_groups_select_and_answers_show_the_state(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("sam", regions=("KE",)), ack_mode="auto")
    hello = await client.next("connection_established")
    assert hello["groups"] == [] and hello["filters"] == {}
    ok = await ask(client, {"type": "subscribe", "groups": ["region:KE-30", "level:critical"]})
    assert ok == {
        "type": "subscription_response",
        "action": "subscribe",
        "groups": ["region:KE-30", "level:critical"],
        "status": "ok",
        "detail": "",
        "subscribed": ["level:critical", "region:KE-30"],
        "filters": {},
    }
    # union: KE-30 at any level, or critical and above anywhere the token allows
    await skipped_then(js, names, client, [alert("KE-31", alert_level="high")], alert("KE-30"))
    await skipped_then(
        js,
        names,
        client,
        [alert("KE-31", alert_level="low")],
        alert("KE-31", alert_level="emergency"),
    )
    await skipped_then(
        js,
        names,
        client,
        [alert("UG-102", alert_level="emergency")],
        alert("KE", alert_level="critical"),
    )
    await client.close()


async def test_level_priority_and_type_groups(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("tia"), ack_mode="auto")
    await client.next("connection_established")
    assert (await ask(client, {"type": "subscribe", "groups": ["priority:urgent"]}))[
        "status"
    ] == "ok"
    await skipped_then(js, names, client, [alert(priority="high")], alert(priority="emergency"))
    await ask(client, {"type": "unsubscribe", "groups": ["priority:urgent"]})
    assert (await ask(client, {"type": "subscribe", "groups": ["type:flood"]}))["subscribed"] == [
        "type:flood"
    ]
    await skipped_then(
        js, names, client, [alert(alert_type="outbreak_risk")], alert(alert_type="flood")
    )
    await client.close()


async def test_denied_and_invalid_frames_change_nothing(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("uma", regions=("KE", "UG-102")))
    await client.next("connection_established")
    denied = await ask(client, {"type": "subscribe", "groups": ["region:KE-30", "region:UG"]})
    assert denied["status"] == "denied" and denied["subscribed"] == []
    assert "region:UG" in denied["detail"] and "region:KE-30" not in denied["detail"]
    for bad in [
        "colour:red",
        "level:extreme",
        "region:Kenya",
        "region:UGA",
        "region",
        "type:Flood",
    ]:
        invalid = await ask(client, {"type": "subscribe", "groups": ["region:KE", bad]})
        assert invalid["status"] == "invalid", bad
        assert bad in invalid["detail"] and invalid["subscribed"] == []
    # a whole-code sub-region of a token region is allowed; UG itself is wider than UG-102
    assert (await ask(client, {"type": "subscribe", "groups": ["region:UG-102"]}))["status"] == "ok"
    assert (await ask(client, {"type": "subscribe", "groups": ["region:UG-10"]}))[
        "status"
    ] == "denied"
    # after all that, the device still receives UG-102 and not KE
    await skipped_then(js, names, client, [alert("KE-30")], alert("UG-102"))
    await client.close()


async def test_update_filters_replace_and_bad_filters_are_named(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("vic"), ack_mode="auto")
    await client.next("connection_established")
    ok = await ask(client, {"type": "update_filters", "filters": {"risk_threshold": 0.5}})
    assert ok["status"] == "ok" and ok["filters"] == {"risk_threshold": 0.5}
    # emergencies ignore the threshold; others need risk_score >= 0.5
    await skipped_then(js, names, client, [alert(risk_score=0.3)], alert(risk_score=0.5))
    await skipped_then(
        js, names, client, [alert(risk_score=0.49)], alert(alert_level="emergency", risk_score=0.1)
    )
    for filters, field in [
        ({"risk": 0.5}, "risk"),
        ({"risk_threshold": 2}, "risk_threshold"),
        ({"risk_threshold": True}, "risk_threshold"),
        ({"location_filter": {"bbox": [0, 10, 1, 5]}}, "location_filter.bbox"),
        ({"location_filter": {}}, "location_filter"),
        ({"alert_types": []}, "alert_types"),
    ]:
        bad = await ask(client, {"type": "update_filters", "filters": filters})
        assert bad["status"] == "invalid" and bad["detail"].startswith(field), (filters, bad)
        assert bad["filters"] == {"risk_threshold": 0.5}
    # the complete new filters: risk_threshold left out is unset
    replaced = await ask(client, {"type": "update_filters", "filters": {"alert_types": ["flood"]}})
    assert replaced["filters"] == {"alert_types": ["flood"]}
    await skipped_then(
        js, names, client, [alert(risk_score=0.9)], alert(alert_type="flood", risk_score=0.0)
    )
    cleared = await ask(client, {"type": "update_filters", "filters": {}})
    assert cleared["status"] == "ok" and cleared["filters"] == {}
    body = alert(risk_score=0.0)
    await append(js, names, body)
    assert await first_alert_id(client) == body["alert_id"]
    await client.close()


async def test_unsubscribing_every_group_means_everything_the_token_allows(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    client = await Client.connect(gateway.ws_url, token("wes"), ack_mode="auto")
    await client.next("connection_established")
    await ask(client, {"type": "subscribe", "groups": ["region:KE-30"]})
    await skipped_then(js, names, client, [alert("KE-31")], alert("KE-30"))
    gone = await ask(client, {"type": "unsubscribe", "groups": ["region:KE-30", "level:low"]})
    assert gone["status"] == "ok" and gone["subscribed"] == []
    await skipped_then(js, names, client, [alert("UG-102")], alert("KE-31"))
    await client.close()


async def test_subscription_persists_in_the_queue_and_filters_the_backlog(
    make_settings: Callable[..., Settings], js: JetStream, names: Names
) -> None:
    """Set on one gateway; the device leaves; alerts come; it returns to another gateway
    (a restart looks the same): the backlog holds exactly what it would have got live."""
    settings = make_settings()
    first = await start_gateway(settings)
    tok = token("xia")
    try:
        client = await Client.connect(first.ws_url, tok)
        await client.next("connection_established")
        await ask(client, {"type": "subscribe", "groups": ["region:KE-30", "region:KE-31"]})
        filters = {"risk_threshold": 0.5, "alert_types": ["flood", "outbreak_risk"]}
        await ask(client, {"type": "update_filters", "filters": filters})
        await client.close()
    finally:
        await first.stop()
    consumer = names.device_consumer("xia", "phone")
    info = await js.consumer_info(names.alerts_stream, consumer)
    stored = orjson.loads(info.config.metadata["tocsin.subscription"])
    groups = ["region:KE-30", "region:KE-31"]
    assert stored == {"filters": filters, "groups": groups}
    prefix = names.alerts_all[:-1]  # the namespace's "alerts."
    assert sorted(info.config.filter_subjects or [info.config.filter_subject]) == [
        f"{prefix}KE.{r}.*.{t}" for r in ("KE-30", "KE-31") for t in ("flood", "outbreak_risk")
    ]
    bodies = [
        alert("KE-30", risk_score=0.9),  # yes
        alert("KE-32", risk_score=0.9),  # no: neither group
        alert("KE-30", risk_score=0.2),  # no: below the threshold
        alert("KE-31", alert_type="flood", risk_score=0.6),  # yes
        alert("KE-31", alert_type="flood", alert_level="emergency", risk_score=0.0),  # yes
        alert("KE-31", alert_type="data_quality", risk_score=0.9),  # no: not a listed type
        alert("UG-102", alert_type="flood", risk_score=0.9),  # no: not the token's
    ]
    for body in bodies:
        await append(js, names, body)
    second = await start_gateway(settings)
    try:
        back = await Client.connect(second.ws_url, tok)
        hello = await back.next("connection_established")
        assert hello["groups"] == groups and hello["filters"] == filters
        got = await back.alerts(3, ack=True)
        assert [f["alert"]["alert_id"] for f in got] == [bodies[i]["alert_id"] for i in (0, 3, 4)]
        sentinel = alert("KE-30", risk_score=1.0)
        await skipped_then(js, names, back, [alert("KE-32")], sentinel)
        await back.close()
    finally:
        await second.stop()


async def test_connect_filters_replace_the_stored_ones_for_the_backlog_too(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    tok = token("yan")
    client = await Client.connect(gateway.ws_url, tok, alert_types="flood")
    hello = await client.next("connection_established")
    assert hello["filters"] == {"alert_types": ["flood"]}
    await client.close()
    flood, outbreak = alert(alert_type="flood"), alert(alert_type="outbreak_risk")
    await append(js, names, flood)
    await append(js, names, outbreak)
    again = await Client.connect(gateway.ws_url, tok, risk_threshold="0.5")
    hello = await again.next("connection_established")
    assert hello["filters"] == {"risk_threshold": 0.5}  # alert_types is gone: replaced
    got = await again.alerts(2, ack=True)
    assert [f["alert"]["alert_id"] for f in got] == [flood["alert_id"], outbreak["alert_id"]]
    await again.close()
    plain = await Client.connect(gateway.ws_url, tok, location_filter="")  # empty: kept
    assert (await plain.next("connection_established"))["filters"] == {"risk_threshold": 0.5}
    await plain.close()


async def test_a_change_keeps_the_queues_ack_state_and_loses_nothing_in_flight(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    """In-flight alerts stay in flight across a change (not sent again on the connection:
    CONTRACT §6), and their ack after it settles them."""
    client = await Client.connect(gateway.ws_url, token("zed"))
    await client.next("connection_established")
    sent = [alert("KE-30"), alert("KE-31")]
    for body in sent:
        await append(js, names, body)
    frames = await client.alerts(2)
    await client.send({"type": "ack", "seq": frames[0]["seq"]})
    await ask(client, {"type": "subscribe", "groups": ["region:KE-30"]})
    await client.send({"type": "get_stats"})  # KE-31 was sent before the change: in flight
    stats = await client.next("connection_stats")
    assert (stats["inflight"], stats["acked_seq"]) == (1, frames[0]["seq"])
    await client.send({"type": "ack", "seq": frames[1]["seq"]})
    await client.send({"type": "get_stats"})
    stats = await client.next("connection_stats")
    assert (stats["inflight"], stats["acked_seq"]) == (0, frames[1]["seq"])
    await skipped_then(js, names, client, [alert("KE-31")], alert("KE-30"))
    await client.close()


async def test_change_while_reading_the_backlog(
    make_settings: Callable[..., Settings], js: JetStream, names: Names
) -> None:
    """A change in catch-up re-reads the queue under the new filters. Every alert sent after
    the answer is judged by the new subscription (frames keep their order), and every
    matching alert not sent before it still comes."""
    running = await start_gateway(make_settings(max_inflight=4))
    tok = token("abe")
    try:
        await Client.introduce(running.ws_url, tok)
        old = [alert("KE-30" if i % 2 else "KE-31") for i in range(40)]
        for body in old:
            await append(js, names, body)
        client = await Client.connect(running.ws_url, tok)
        await client.next("connection_established")
        # reading the backlog, window 4, nothing acked yet
        before: list[dict[str, Any]] = [await client.next("alert")]
        await client.send({"type": "subscribe", "groups": ["region:KE-31"]})
        while (frame := await client.next())["type"] != "subscription_response":
            if frame["type"] == "alert":
                before.append(frame)
        assert frame["status"] == "ok"
        late = [alert("KE-30"), alert("KE-31")]
        for body in late:
            await append(js, names, body)
        after: list[dict[str, Any]] = []
        for f in before:
            await client.send({"type": "ack", "seq": f["seq"]})
        while not after or after[-1]["alert"]["alert_id"] != late[1]["alert_id"]:
            frame = await client.next("alert", timeout=20)
            await client.send({"type": "ack", "seq": frame["seq"]})
            after.append(frame)
        fresh = [f for f in after if not f["redelivered"]]
        assert all(f["alert"]["location"]["region"] == "KE-31" for f in fresh)
        seqs = [f["seq"] for f in [*before, *fresh]]
        assert seqs == sorted(set(seqs))  # in order, each once
        sent_before = {f["alert"]["alert_id"] for f in before}
        owed = [b["alert_id"] for b in [*old, *late] if b["location"]["region"] == "KE-31"]
        assert [f["alert"]["alert_id"] for f in fresh] == [i for i in owed if i not in sent_before]
        await client.close()
    finally:
        await running.stop()


async def test_changes_racing_with_deliveries(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    """A publisher runs while the device moves between KE-30 and KE-31 (subscribe the new
    region, then unsubscribe the old). Frames keep their order, so every alert that arrives
    after an answer was judged by the subscription that answer reports: KE-32 never comes,
    and after the unsubscribe only the one region does. Alerts the gateway saw between an
    answer and the next change arrive exactly when they match."""
    client = await Client.connect(gateway.ws_url, token("bea"))
    await client.next("connection_established")
    rng = random.Random(7)
    published: list[tuple[int, dict[str, Any], float, float]] = []  # seq, body, start, end
    stop = asyncio.Event()
    # The publisher runs beside the changes but only as far as its allowance: free-running
    # to a fixed count it could finish before slow changes (a loaded CI machine) were done.
    allowance = 40
    more = asyncio.Event()

    async def publisher() -> None:
        while not stop.is_set():
            if len(published) >= allowance:
                more.clear()
                await more.wait()
                continue
            body = alert(rng.choice(["KE-30", "KE-31", "KE-32"]))
            start = time.monotonic()
            ack = await append(js, names, body)
            published.append((ack.seq, body, start, time.monotonic()))

    events: list[tuple[float, dict[str, Any]]] = []  # every frame, in arrival order
    answers: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def reader() -> None:
        while True:
            frame = await client.next(timeout=60)
            events.append((time.monotonic(), frame))
            if frame["type"] == "alert":
                await client.send({"type": "ack", "seq": frame["seq"]})
            elif frame["type"] in ("subscription_response", "connection_stats"):
                answers.put_nowait(frame)

    async def ask_(frame: dict[str, Any]) -> dict[str, Any]:
        await client.send(frame)
        return await asyncio.wait_for(answers.get(), 10)

    read = asyncio.create_task(reader())
    first = await ask_({"type": "subscribe", "groups": ["region:KE-31"]})
    assert first["status"] == "ok"
    pub = asyncio.create_task(publisher())
    windows: list[tuple[str, float, float]] = []  # region alone in effect, from, until
    current = "KE-31"
    try:
        for i in range(12):
            region = "KE-30" if i % 2 == 0 else "KE-31"
            allowance = len(published) + 40  # bounded: 12 changes x 40 alerts at most
            more.set()
            assert (await ask_({"type": "subscribe", "groups": [f"region:{region}"]}))[
                "status"
            ] == "ok"
            if current:
                answer = await ask_({"type": "unsubscribe", "groups": [f"region:{current}"]})
                assert answer["subscribed"] == [f"region:{region}"]
            since = time.monotonic()
            enough = len(published) + 10
            # Slow changes (a loaded machine) may have used the allowance up meanwhile:
            # without this the wait below waited for a publisher that was told to stop.
            allowance = max(allowance, enough)
            more.set()
            await eventually(lambda: len(published) >= enough, 20, "publishes")  # noqa: B023
            top = published[-1][0]
            await eventually(lambda: gateway.gw.feed.last_seq >= top, 10, "feed")  # noqa: B023
            windows.append((region, since, published[-1][3]))
            current = region
    finally:
        stop.set()
        more.set()
        await pub
    last = published[-1][0]
    await eventually(lambda: gateway.gw.feed.last_seq >= last, 10, "the feed")
    deadline = time.monotonic() + 10
    while (await ask_({"type": "get_stats"}))["mode"] != "live":  # all judged and sent
        assert time.monotonic() < deadline
    read.cancel()
    alone: str | None = None
    fresh_seqs = []
    for _, frame in events:
        if frame["type"] == "subscription_response":
            held = frame["subscribed"]
            alone = held[0].split(":")[1] if len(held) == 1 else None
        elif frame["type"] == "alert" and not frame["redelivered"]:
            fresh_seqs.append(frame["seq"])
            region = frame["alert"]["location"]["region"]
            assert region != "KE-32"
            assert alone is None or region == alone, (alone, region)
    assert fresh_seqs == sorted(set(fresh_seqs))
    got = {f["alert"]["alert_id"] for _, f in events if f["type"] == "alert"}
    checked = 0
    for region, since, until in windows:
        for _, body, start, end in published:
            if start > since and end <= until:
                wanted = body["location"]["region"] == region
                assert (body["alert_id"] in got) is wanted, (region, body["location"])
                checked += 1
    assert checked >= 60  # the exact windows held enough alerts to mean something
    await client.close()


async def test_filters_that_can_match_nothing_leave_the_queue_empty_not_open(
    gateway: RunningGateway, js: JetStream, names: Names
) -> None:
    """A consumer without filter subjects would take every alert: a subscription that can
    match nothing gets a filter no alert subject matches, and clearing it restores delivery."""
    client = await Client.connect(gateway.ws_url, token("cat", regions=("KE",)))
    await client.next("connection_established")
    nothing = await ask(
        client, {"type": "update_filters", "filters": {"location_filter": {"regions": ["UG"]}}}
    )
    assert nothing["status"] == "ok"
    info = await js.consumer_info(names.alerts_stream, names.device_consumer("cat", "phone"))
    assert info.config.filter_subject == f"{names.alerts_all[:-1]}NONE"
    await client.close()
    await append(js, names, alert("KE-30"))
    back = await Client.connect(gateway.ws_url, token("cat", regions=("KE",)))
    assert (await back.next("connection_established"))["pending"] == 0
    await ask(back, {"type": "update_filters", "filters": {}})
    body = alert("KE-30")
    await append(js, names, body)
    assert await first_alert_id(back) == body["alert_id"]
    await back.close()
