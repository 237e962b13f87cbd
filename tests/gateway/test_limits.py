"""Open to the internet (issue 11, CONTRACT §6): rate limits, bans and connection caps that
hold across gateway instances, and browser origins. Two in-process gateways share one
nats-server and namespace, as two instances behind a load balancer would."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.guard import LEASE_SECONDS, user_key
from tocsin.schemas.codes import Close

from ..support import (
    Client,
    GatewayProcess,
    alert,
    append,
    eventually,
    handshake,
    handshake_with,
    run_tocsin,
    session_of,
    start_gateway,
    token,
)


async def tocsin_ban(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``tocsin ban ARGS`` as an operator runs it, in its own process (exit code, out, err)."""
    return await run_tocsin(settings, "ban", *args)


# ------------------------------------------------------------------ the rate limit


async def test_frames_over_the_rate_limit_are_dropped_with_one_warning(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """A burst of 5, then one frame a minute: of 20 get_stats sent at once, 5 are answered,
    the rest dropped, the first drop warned (limit, retry_after_s). Acks and pongs pass
    even then: they are not counted."""
    running = await start_gateway(
        make_settings(max_messages_per_minute=1, rate_limit_burst=5, ban_after_warnings=100)
    )
    try:
        client = await Client.connect(running.ws_url, token("flood", ("KE",)))
        await client.next("connection_established")
        session = session_of(running, "flood")
        for _ in range(20):
            await client.send({"type": "get_stats"})
        await eventually(lambda: session.limit.dropped == 15, what="15 frames dropped")
        answers = [await client.next() for _ in range(6)]
        kinds = [f["type"] for f in answers]
        assert kinds == ["connection_stats"] * 5 + ["rate_limit_warning"], kinds
        warning = answers[-1]
        assert warning["limit"] == 1 and 0 < warning["retry_after_s"] <= 60
        assert session.rate_limit_warnings >= 1
        sent = await append(js, names, alert("KE-30"))
        [frame] = await client.alerts(1)
        await client.send({"type": "pong", "ts": 1.0})
        await client.send({"type": "ack", "seq": frame["seq"]})
        await eventually(lambda: session.window.floor >= sent.seq, what="the ack applied")
        assert session.limit.dropped == 15  # neither was counted
        await client.close()
    finally:
        await running.stop()


# ------------------------------------------------------------------ bans


async def test_warnings_ban_the_user_on_every_instance_until_lifted(
    make_settings: Callable[..., Settings], js: JetStreamContext, tmp_path: Any
) -> None:
    """A client that ignores its warnings (one a second: the bucket refills a token a second)
    and two warnings within a minute ban the user: its sockets on both gateways close with
    1008, its handshakes get 429 banned with Retry-After on both; an operator lists and lifts
    the ban with `tocsin ban` and the user is let in again."""
    settings = make_settings(
        max_messages_per_minute=60, rate_limit_burst=1, ban_after_warnings=2, ban_duration_minutes=5
    )
    one, two = await start_gateway(settings), await start_gateway(settings)
    try:
        noisy = await Client.connect(one.ws_url, token("mallory", ("KE",)), client_id="a")
        other = await Client.connect(two.ws_url, token("mallory", ("KE",)), client_id="b")
        await noisy.next("connection_established")
        await other.next("connection_established")
        started = time.monotonic()
        while not noisy.closed.is_set():  # warnings are a second apart: two take ~1 s
            await noisy.send({"type": "get_stats"})
            assert time.monotonic() - started < 30, "no ban within 30 s"
            await asyncio.wait([asyncio.ensure_future(noisy.closed.wait())], timeout=0.05)
        assert noisy.close_code == Close.POLICY_VIOLATION
        assert await other.wait_closed() == Close.POLICY_VIOLATION
        for gw in (one, two):
            status, body, headers = await handshake(gw.ws_url, auth_token=token("mallory", ("KE",)))
            assert status == 429 and body["error"] == "banned", body
            assert 1 <= int(headers["Retry-After"]) <= 300
        code, out, err = await tocsin_ban(settings, "list")
        assert code == 0 and "'mallory'" in out, err
        code, out, err = await tocsin_ban(settings, "lift", "mallory")
        assert code == 0, err

        async def let_in() -> bool:
            status, _, _ = await handshake(two.ws_url, auth_token=token("mallory", ("KE",)))
            return status == 101

        await eventually(let_in, what="the user let in once the ban is lifted")
        await noisy.session.close()
        await other.session.close()
    finally:
        await one.stop()
        await two.stop()


async def test_an_operator_ban_closes_open_sockets(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    settings = make_settings()
    running = await start_gateway(settings)
    try:
        client = await Client.connect(running.ws_url, token("eve", ("KE",)))
        await client.next("connection_established")
        code, _, err = await tocsin_ban(settings, "add", "eve", "--minutes", "2")
        assert code == 0, err
        assert await client.wait_closed() == Close.POLICY_VIOLATION
        await client.session.close()
    finally:
        await running.stop()


async def test_a_ban_refuses_a_token_verified_before_it(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """The gateway keeps verified tokens (core/auth.py TokenCache); a ban issued after the
    token went into the cache still refuses the device's next handshake with that token."""
    settings = make_settings()
    running = await start_gateway(settings)
    try:
        tok = token("ada", ("KE",))
        client = await Client.connect(running.ws_url, tok)
        await client.next("connection_established")
        assert running.gw.verifier.cache.get(tok) is not None
        code, _, err = await tocsin_ban(settings, "add", "ada", "--minutes", "2")
        assert code == 0, err
        assert await client.wait_closed() == Close.POLICY_VIOLATION
        await client.session.close()
        status, body, _ = await handshake(running.ws_url, auth_token=tok)
        assert status == 429 and body["error"] == "banned", body
    finally:
        await running.stop()


# ------------------------------------------------------------------ connection caps


async def test_the_connection_cap_holds_across_instances_and_spares_a_reconnect(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """Cap 2: a phone on one gateway and a tablet on the other fill it; a third device gets
    429 too_many_connections on either; the phone reconnecting on the other gateway (its
    takeover of the old connection) is let in; once the tablet leaves, the third device is."""
    settings = make_settings(max_connections_per_user=2)
    one, two = await start_gateway(settings), await start_gateway(settings)
    tok = token("capped", ("KE",))
    try:
        phone = await Client.connect(one.ws_url, tok, client_id="phone")
        tablet = await Client.connect(two.ws_url, tok, client_id="tablet")
        await phone.next("connection_established")
        await tablet.next("connection_established")
        for gw in (one, two):
            status, body, headers = await handshake(gw.ws_url, auth_token=tok, client_id="desk")
            assert status == 429 and body["error"] == "too_many_connections", body
            assert headers["Retry-After"] == "1"
        again = await Client.connect(two.ws_url, tok, client_id="phone")
        await again.next("connection_established")
        assert await phone.wait_closed() == Close.REPLACED
        await tablet.close()

        async def desk_in() -> bool:
            status, _, _ = await handshake(one.ws_url, auth_token=tok, client_id="desk")
            return status == 101

        await eventually(desk_in, what="a slot freed by the tablet")
        await again.close()
        await phone.session.close()
    finally:
        await one.stop()
        await two.stop()


async def test_slots_are_counted_from_the_watch_and_listed_only_past_the_cap(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """A handshake within the cap is counted from the slots the gateway watches (no
    STREAM.INFO); one over it is listed from the bucket before it is refused. A slot the
    watch saw written but not removed (purged from the stream, as an older gateway does)
    counts in the watch only: the listing lets the handshake in."""
    settings = make_settings(max_connections_per_user=2)
    running = await start_gateway(settings)
    guard = running.gw.guard
    tok = token("counted", ("KE",))
    try:
        phone = await Client.connect(running.ws_url, tok, client_id="phone")
        await phone.next("connection_established")
        assert guard.slot_counts == {"watched": 1, "listed": 0}
        # A slot of another device of the user on this instance, then purged unseen.
        ghost = f"$KV.{names.guard_bucket}.conn.{user_key('counted')}.{guard.instance}.0000"
        ack = await js.publish(ghost, b"{}")
        await eventually(lambda: guard.slots_seen >= ack.seq, what="the ghost slot watched")
        await js.purge_stream(f"KV_{names.guard_bucket}", subject=ghost)
        tablet = await Client.connect(running.ws_url, tok, client_id="tablet")
        await tablet.next("connection_established")  # 3 watched, 2 listed: let in
        assert guard.slot_counts == {"watched": 2, "listed": 1}
        status, body, _ = await handshake(running.ws_url, auth_token=tok, client_id="desk")
        assert status == 429 and body["error"] == "too_many_connections", body
        assert guard.slot_counts["listed"] >= 2  # (the helper asks twice for the body)
        await phone.close()
        await tablet.close()
    finally:
        await running.stop()


async def test_the_lease_sweep_purges_own_slots_no_connection_holds(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """A slot of this instance that no open connection holds (its release failed while NATS
    was away) is purged by the sweep, from the slots watched; a held one stays."""
    running = await start_gateway(make_settings())
    guard = running.gw.guard
    try:
        client = await Client.connect(running.ws_url, token("kept", ("KE",)))
        await client.next("connection_established")
        leak = f"$KV.{names.guard_bucket}.conn.{user_key('leaked')}.{guard.instance}.0000"
        ack = await js.publish(leak, b"{}")
        await eventually(lambda: guard.slots_seen >= ack.seq, what="the leaked slot watched")
        assert user_key("leaked") in guard.slots
        await guard._sweep_own()
        await eventually(lambda: user_key("leaked") not in guard.slots, what="the leak purged")
        assert user_key("kept") in guard.slots
        await client.close()
    finally:
        await running.stop()


@pytest.mark.slow
async def test_slots_of_a_killed_gateway_come_back_within_a_lease(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    """A gateway killed with SIGKILL cannot give its slots back: they count until its lease
    lapses (LEASE_SECONDS without a renewal), then no more. The time it took is printed."""
    settings = make_settings(max_connections_per_user=1)
    doomed = gateway_process(settings)
    tok = token("orphan", ("KE",))
    held = await Client.connect(doomed.ws_url, tok, client_id="phone")
    await held.next("connection_established")
    running = await start_gateway(settings)
    try:
        status, body, _ = await handshake(running.ws_url, auth_token=tok, client_id="tablet")
        assert status == 429 and body["error"] == "too_many_connections"
        doomed.kill()
        killed = time.monotonic()

        async def tablet_in() -> bool:
            status, _, _ = await handshake(running.ws_url, auth_token=tok, client_id="tablet")
            return status == 101

        await eventually(tablet_in, timeout=LEASE_SECONDS + 20, what="the slot back")
        took = time.monotonic() - killed
        print(f"slot back {took:.1f} s after SIGKILL (lease {LEASE_SECONDS:g} s)")
        assert took > LEASE_SECONDS / 3  # not at once: the lease of a live-looking gateway held
        await held.session.close()
    finally:
        await running.stop()


async def test_keys_carry_no_user_input(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """Users and devices named with NATS wildcards, dots, spaces, unicode and `$JS` connect
    and are counted under digests: nothing of theirs becomes a subject token."""
    running = await start_gateway(make_settings(max_connections_per_user=3))
    try:
        odd = ["*", ">", "a.b", "two words", "ünï", "$JS.API", "..", "x" * 128]
        for sub in odd:
            client = await Client.connect(running.ws_url, token(sub, ("KE",)), client_id="a.b")
            await client.next("connection_established")
            subjects = await slot_subjects(js, names)
            assert any(f".conn.{user_key(sub)}." in s for s in subjects), subjects
            assert all(s.count(".") == 5 for s in subjects), subjects  # $KV.B.conn.u.gw.dev
            await client.close()
    finally:
        await running.stop()


async def slot_subjects(js: JetStreamContext, names: Names) -> list[str]:
    info = await js.stream_info(
        f"KV_{names.guard_bucket}", subjects_filter=f"$KV.{names.guard_bucket}.conn.>"
    )
    return list((info.state.subjects or {}).keys())


# ------------------------------------------------------------------ origins


@pytest.mark.parametrize(
    ("allowed", "origin", "status"),
    [
        ([], None, 101),  # not a browser
        ([], "http://evil.example", 403),
        ([], "SAME", 101),  # the gateway's own origin
        (["https://app.example.org"], "https://app.example.org", 101),
        (["https://app.example.org"], "https://evil.example", 403),
        (["*"], "https://anything.example", 101),
    ],
)
async def test_browser_origins(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    allowed: list[str],
    origin: str | None,
    status: int,
) -> None:
    running = await start_gateway(make_settings(allowed_origins=allowed))
    try:
        params = {"auth_token": token("browser", ("KE",))}
        if origin is not None:
            params["origin"] = f"http://127.0.0.1:{running.port}" if origin == "SAME" else origin
        headers = {"Origin": params.pop("origin")} if "origin" in params else {}
        got, body, _ = await handshake_with(running.ws_url, headers, params)
        assert got == status, body
        if status == 403:
            assert body["error"] == "origin_not_allowed"
    finally:
        await running.stop()


async def test_security_events_leave_one_audit_line_each_without_the_token(
    make_settings: Callable[..., Settings], js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_gateway(make_settings())
    tok = token("audited", ("KE",))
    try:
        caplog.set_level(logging.INFO, logger="tocsin.audit")
        await handshake_with(
            running.ws_url, {"Origin": "https://evil.example"}, {"auth_token": tok}
        )
        await handshake(running.ws_url, auth_token=tok[:-4] + "AAAA")  # a bad signature
        events = [r for r in caplog.records if r.name == "tocsin.audit"]
        # handshake() asks twice (the upgrade, then a GET for the body): a line each
        assert [getattr(r, "event", None) for r in events] == ["origin_refused"] * 2 + [
            "invalid_signature"
        ] * 2
        for record in events:
            text = record.getMessage() + repr(record.__dict__)
            assert tok.split(".")[1] not in text  # not even the token's payload
    finally:
        await running.stop()


async def test_a_handshake_sent_a_byte_at_a_time_is_dropped(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """A slow-loris upgrade (the request line, one header, then nothing) is closed once
    TOCSIN_HANDSHAKE_TIMEOUT_SECONDS pass without a whole request; a WebSocket that opened
    in time stays open well past it."""
    # Heartbeats of 1 s: two of silence (2 s) before a close, so a loaded machine's slow
    # loop does not close the client whose WebSocket pongs alone keep it (at 0.5 s a pong
    # late by half a second did, once, in CI).
    running = await start_gateway(make_settings(handshake_timeout_seconds=1, heartbeat_seconds=1))
    try:
        ok = await Client.connect(running.ws_url, token("patient", ("KE",)))
        ok.answer_pings = False  # pings queued for next(); its WebSocket pongs keep it
        await ok.next("connection_established")
        reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
        writer.write(b"GET /api/v1/alerts/ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 15) == b""  # closed, nothing answered
        writer.close()
        for _ in range(3):  # three seconds of pings: three handshake timeouts
            await ok.next("ping")
        assert not ok.closed.is_set()
        await ok.close()
    finally:
        await running.stop()


async def test_one_user_can_never_read_or_settle_another_users_queue(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """Read: a user connecting with another's client_id (and with names built to collide
    once joined: ``a__b``/``c`` against ``a``/``b__c``) opens a queue of its own, empty,
    and gets nothing of the other's backlog. Ack: acking the other's seqs settles nothing
    of the other's: its backlog is whole when it comes back. No client frame names a
    queue, so reset and delete have no path at all: subscription changes act on the
    connection's own device."""
    running = await start_gateway(make_settings())
    try:
        victim = token("a", ("KE",))
        await Client.introduce(running.ws_url, victim, client_id="b__c")
        missed = [await append(js, names, alert("KE-30")) for _ in range(3)]
        intruder = await Client.connect(running.ws_url, token("a__b", ("KE",)), client_id="c")
        hello = await intruder.next("connection_established")
        assert hello["pending"] == 0
        for m in missed:  # below its own queue's start: nothing of its own to settle
            await intruder.send({"type": "ack", "seq": m.seq})
        await intruder.send({"type": "update_filters", "filters": {"risk_threshold": 0.9}})
        await intruder.next("subscription_response")
        await intruder.nothing_more()
        await intruder.close()
        back = await Client.connect(running.ws_url, victim, client_id="b__c")
        assert (await back.next("connection_established"))["pending"] == 3
        got = await back.alerts(3, ack=True)
        assert [f["seq"] for f in got] == [m.seq for m in missed]
        await back.close()
        assert names.device_consumer("a", "b__c") != names.device_consumer("a__b", "c")
    finally:
        await running.stop()
