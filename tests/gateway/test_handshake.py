"""Tokens at the handshake and while connected; malformed frames (CONTRACT §3, §6)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import aiohttp
import jwt
import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..conftest import SECRET
from ..support import (
    Client,
    GatewayProcess,
    RunningGateway,
    SilentClient,
    alert,
    append,
    handshake,
    start_gateway,
    token,
)


@pytest.mark.parametrize(
    ("tok", "error"),
    [
        ("", "missing_token"),
        ("not-a-jwt", "malformed_token"),
        (token("x", ttl=-10), "token_expired"),
        (token("x", secret="another-secret-another-secret-0123"), "invalid_signature"),
        (jwt.encode({"sub": "x"}, SECRET, algorithm="HS256"), "invalid_claims"),
        (
            jwt.encode({"sub": "x", "exp": 9e9, "regions": ["Kenya"]}, SECRET, algorithm="HS256"),
            "invalid_claims",
        ),
        (jwt.encode({"sub": "x", "exp": 9e9}, "", algorithm="none"), "invalid_signature"),
    ],
)
async def test_bad_tokens_get_401_with_json_body(
    gateway: RunningGateway, tok: str, error: str
) -> None:
    status, body, _ = await handshake(gateway.ws_url, auth_token=tok)
    assert status == 401
    assert body["error"] == error and body["detail"]


async def test_bearer_header_is_accepted(gateway: RunningGateway) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(gateway.ws_url, headers={"Authorization": f"Bearer {token()}"}) as ws,
    ):
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "connection_established"


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"client_id": "has space"}, 400, "client_id"),
        ({"ack_mode": "sometimes"}, 400, "ack_mode"),
        ({"risk_threshold": "1.5"}, 400, "risk_threshold"),
        ({"risk_threshold": "high"}, 400, "risk_threshold"),
        ({"location_filter": "{not json"}, 400, "location_filter"),
        ({"location_filter": '{"bbox": [0, 0, 1]}'}, 400, "location_filter.bbox"),
        ({"location_filter": '{"near": {"lat": 91, "lon": 0, "radius_km": 1}}'}, 400, "lat"),
        ({"alert_types": "outbreak_risk,Not A Type"}, 400, "alert_types"),
    ],
)
async def test_bad_parameters_are_named(
    gateway: RunningGateway, params: dict[str, str], status: int, needle: str
) -> None:
    code, body, _ = await handshake(gateway.ws_url, auth_token=token(), **params)
    assert code == status and needle in str(body["detail"])


async def test_token_without_regions_is_refused(gateway: RunningGateway) -> None:
    code, body, _ = await handshake(gateway.ws_url, auth_token=token(regions=()))
    assert code == 403 and body["error"] == "no_regions"


async def test_admin_receives_every_region(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    client = await Client.connect(
        gateway.ws_url, token("root", (), roles=("admin",)), ack_mode="auto"
    )
    await client.next("connection_established")
    seqs = [(await append(js, names, alert(r))).seq for r in ("KE-30", "UG", "FJ-C")]
    assert [f["seq"] for f in await client.alerts(3)] == seqs
    await client.close()


async def test_token_expiring_while_connected_closes_with_4401(gateway: RunningGateway) -> None:
    client = await Client.connect(gateway.ws_url, token(ttl=1))
    await client.next("connection_established")
    assert await client.wait_closed(timeout=5) == 4401


@pytest.mark.parametrize(
    ("raw", "code", "needle"),
    [
        ("{not json", "invalid_json", "JSON"),
        ("[1, 2]", "invalid_frame", "object"),
        ('{"type": "dance"}', "unknown_type", "type"),
        ('{"no_type": 1}', "unknown_type", "type"),
        ('{"type": "ack"}', "invalid_frame", "seq"),
        ('{"type": "ack", "seq": "x"}', "invalid_frame", "seq"),
        ('{"type": "ack", "seq": 1, "extra": true}', "invalid_frame", "extra"),
        ('{"type": "ack", "seq": 1, "pad": "' + "x" * 70_000 + '"}', "frame_too_large", "64"),
    ],
)
async def test_malformed_frames_get_an_error_and_the_connection_lives_on(
    gateway: RunningGateway, js: JetStreamContext, names: Names, raw: str, code: str, needle: str
) -> None:
    client = await Client.connect(gateway.ws_url, token(), ack_mode="auto")
    await client.next("connection_established")
    await client.ws.send_str(raw)
    err = await client.next("error")
    assert err["code"] == code and needle in err["detail"]
    assert err["closes"] is False
    sent = await append(js, names, alert())
    [frame] = await client.alerts(1)  # still served
    assert frame["seq"] == sent.seq
    await client.close()


async def test_binary_frames_are_refused_politely(gateway: RunningGateway) -> None:
    client = await Client.connect(gateway.ws_url, token())
    await client.next("connection_established")
    await client.ws.send_bytes(b"\x00\x01")
    assert (await client.next("error"))["code"] == "binary_not_supported"
    await client.send({"type": "get_stats"})
    assert (await client.next("connection_stats"))["mode"] in ("live", "catchup")
    await client.close()


async def test_missing_pongs_close_the_socket(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    running = await start_gateway(make_settings(heartbeat_seconds=1.0))
    try:
        quiet = await SilentClient.connect(running.ws_url, token("mute"))
        lively = await Client.connect(running.ws_url, token("chatty"))
        await quiet.next("connection_established")
        await lively.next("connection_established")
        assert await quiet.wait_closed(timeout=10) == 4000
        assert not lively.closed.is_set(), f"the lively client was closed: {lively.close_code}"
        await lively.send({"type": "get_stats"})
        stats = await lively.next("connection_stats")
        assert stats["latency_ms"] is not None  # it answered pings and is still here
        await lively.close()
    finally:
        await running.stop()


async def test_a_stalled_gateway_does_not_blame_its_clients(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """While the gateway's loop is blocked (a long GC pause, a starved CPU) the clients' pongs
    wait unread in socket buffers. The first heartbeat check after the stall must not close a
    client for silence that was the gateway's own (CI saw it once on a loaded machine)."""
    import time

    running = await start_gateway(make_settings(heartbeat_seconds=1.0))
    try:
        lively = await Client.connect(running.ws_url, token("lively"))
        await lively.next("connection_established")
        deadline = time.monotonic() + 10
        while True:  # wait until a ping has been answered: last_heard is then a pong
            await lively.send({"type": "get_stats"})
            if (await lively.next("connection_stats"))["latency_ms"] is not None:
                break
            assert time.monotonic() < deadline, "no ping within 10 s"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lively.closed.wait(), 0.1)
        time.sleep(2.5)  # noqa: ASYNC251 - the stall itself: blocks the loop on purpose
        # The ticker runs first after the stall; then two more heartbeats, answered.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(lively.closed.wait(), 2.5)
        assert not lively.closed.is_set(), f"closed with {lively.close_code} after the stall"
        await lively.close()
    finally:
        await running.stop()


async def test_any_frame_from_the_client_counts_as_alive(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """A client busy acking a burst may answer a ping late; what it sends still shows it is
    there. Only a client that sends nothing at all for two heartbeats is closed."""
    running = await start_gateway(make_settings(heartbeat_seconds=1.0))
    try:
        busy = await SilentClient.connect(running.ws_url, token("busy"))
        silent = await SilentClient.connect(running.ws_url, token("silent"))
        await busy.next("connection_established")
        await silent.next("connection_established")
        stats = 0
        while not silent.closed.is_set():  # bounded: the silent one closes within ~2-3 s
            await busy.send({"type": "get_stats"})
            await busy.next("connection_stats")
            stats += 1
            assert stats < 400, "the silent client was never closed"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(silent.closed.wait(), 0.2)
        assert silent.close_code == 4000
        assert not busy.closed.is_set()
        await busy.send({"type": "get_stats"})
        assert (await busy.next("connection_stats"))["type"] == "connection_stats"
        await busy.close()
    finally:
        await running.stop()


async def test_a_bare_pong_answers_the_latest_ping(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """``ts`` of a pong is optional: a bare pong answers the latest ping, so the client
    counts as healthy (the stats' healthy_connections)."""
    running = await start_gateway(make_settings(heartbeat_seconds=1.0))
    try:
        client = await Client.connect(running.ws_url, token("bare"))
        client.answer_pings = False
        await client.next("connection_established")
        ping = await client.next("ping")
        await client.send({"type": "pong"})
        await client.send({"type": "get_stats"})  # a round trip: the pong was handled
        await client.next("connection_stats")
        [session] = [s for s in running.gw.sessions if s.device.user_id == "bare"]
        # answered: this ping, or a later one if it went out before the pong was read
        assert session.answered_ts is not None and session.answered_ts >= ping["ts"]
        await client.close()
    finally:
        await running.stop()


@pytest.mark.slow
async def test_a_slow_handshake_is_not_the_clients_silence(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    """Heartbeats count from the end of the handshake. Here the handshake waits for a
    gateway that is frozen (SIGSTOP) for 3 s while it owns the device: longer than two
    heartbeats, during which no ping could be sent. Once it thaws it lets the device go; the
    new client must not be closed for the wait (it was, with 4000, right after
    ``connection_established``)."""
    import signal
    import time

    from ..support import start_gateway

    frozen = gateway_process(make_settings())
    old = await Client.connect(frozen.ws_url, token("ines"))
    await old.next("connection_established")
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    thaw = asyncio.get_running_loop().call_later(3.0, frozen.proc.send_signal, signal.SIGCONT)
    running = await start_gateway(make_settings(heartbeat_seconds=1.0, takeover_seconds=20))
    try:
        started = time.monotonic()
        new = await Client.connect(running.ws_url, token("ines"))
        await new.next("connection_established", timeout=20)
        assert time.monotonic() - started > 2.5  # it waited for the thaw: > 2 heartbeats
        assert await old.wait_closed() == 4009
        with contextlib.suppress(TimeoutError):  # two more heartbeats, answered
            await asyncio.wait_for(new.closed.wait(), 2.5)
        assert not new.closed.is_set(), f"closed with {new.close_code} after the handshake"
        await new.close()
    finally:
        thaw.cancel()
        frozen.proc.send_signal(signal.SIGCONT)
        await old.close()
        await running.stop()


@pytest.mark.parametrize(
    ("mode", "asked", "compressed"),
    [
        ("client", False, False),  # the default: a browser offers, but did not ask
        ("client", True, True),
        ("on", False, True),
        ("off", True, False),
    ],
)
async def test_compression_is_negotiated_where_the_setting_and_the_client_want_it(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    mode: str,
    asked: bool,
    compressed: bool,
) -> None:
    """The client offers permessage-deflate (browsers always do); it gets it with
    TOCSIN_WS_COMPRESSION=on, or =client when it asked with compression=deflate. Either
    way alerts arrive intact."""
    running = await start_gateway(make_settings(ws_compression=mode))
    try:
        async with aiohttp.ClientSession() as http:
            params = {"auth_token": token("cara"), "client_id": "phone"}
            if asked:
                params["compression"] = "deflate"
            async with http.ws_connect(running.ws_url, params=params, compress=15) as ws:
                # the window bits the server answered in Sec-WebSocket-Extensions; 0: none
                assert (ws.compress != 0) is compressed, ws.compress
                hello = await ws.receive_json(timeout=10)
                assert hello["type"] == "connection_established"
                body = alert("KE-30", message="malaria " * 200)
                sent = await append(js, names, body)
                frame = await ws.receive_json(timeout=10)
                assert frame["seq"] == sent.seq and frame["alert"]["message"] == body["message"]
    finally:
        await running.stop()


async def test_an_unknown_compression_is_refused_by_name(gateway: RunningGateway) -> None:
    status, body, _ = await handshake(
        gateway.ws_url, auth_token=token("cara"), client_id="phone", compression="gzip"
    )
    assert status == 400 and body["error"] == "invalid_parameter"
    assert str(body["detail"]).startswith("compression:")
