"""Dead links (issue 16): WebSocket pings beside the protocol's, a half-open peer found by
its silence, and everything its session held let go."""

from __future__ import annotations

import socket
from collections.abc import Callable

import aiohttp
from nats.js import JetStreamContext

from tocsin.bench.netem import small_window
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.schemas.codes import Close

from ..support import (
    Client,
    RunningGateway,
    SilentClient,
    alert,
    append,
    eventually,
    reading_stopped,
    session_of,
    start_gateway,
    token,
)

HEARTBEAT = 0.5  # the ticker then visits each session every 0.25 s (sweep_seconds)


async def test_websocket_pongs_keep_a_client_alive(
    make_settings: Callable[..., Settings], js: JetStreamContext
) -> None:
    """A client whose application never answers the protocol's pings (its scripts are
    throttled, it is busy) while its WebSocket stack answers WebSocket pings, as every
    browser's does: the link is alive, the connection stays. Five pings arrive: three
    heartbeats more than the two after which silence closes it. Heartbeats of 1 s, not
    HEARTBEAT: a pong's round trip within one loop takes several of its passes, and at
    0.5 s a loaded machine's slow passes made one late enough to close the client."""
    running = await start_gateway(make_settings(heartbeat_seconds=1.0))
    try:
        busy = await Client.connect(running.ws_url, token("busy"))
        busy.answer_pings = False
        await busy.next("connection_established")
        for _ in range(5):
            await busy.next("ping")
        assert not busy.closed.is_set(), f"closed with {busy.close_code}"
        assert session_of(running, "busy").ws_pongs >= 3
        await busy.send({"type": "get_stats"})
        stats = await busy.next("connection_stats")
        assert stats["latency_ms"] is None  # the protocol's pings were never answered
        await busy.close()
    finally:
        await running.stop()


async def test_the_gateway_answers_websocket_pings(gateway: RunningGateway) -> None:
    """The gateway reads its socket with autoping off (to see pongs): it still answers a
    client's WebSocket ping with a pong carrying the same payload (RFC 6455 §5.5.3)."""
    async with aiohttp.ClientSession() as http:
        params = {"auth_token": token("pinger")}
        async with http.ws_connect(gateway.ws_url, params=params, autoping=False) as ws:
            await ws.ping(b"are you there")
            for _ in range(20):  # connection_established, perhaps a ping, then the pong
                msg = await ws.receive(timeout=10)
                if msg.type is aiohttp.WSMsgType.PONG:
                    assert msg.data == b"are you there"
                    break
            else:
                raise AssertionError("no pong")


async def test_a_half_open_link_is_found_and_its_session_let_go(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """A phone that enters a tunnel: its socket stays open but nothing comes back, not even
    a TCP FIN (here: the client stops reading and sends nothing, so neither kind of pong
    comes). The gateway closes it for silence (4000), lets everything of the session go
    (its place in the gateway's sessions, the device's claim, its queue reads), and the next
    connection of the device gets at once what the vanished one had unacked, flagged."""
    running = await start_gateway(make_settings(heartbeat_seconds=HEARTBEAT))
    try:
        phone = await SilentClient.connect(running.ws_url, token("tunnel", ("KE",)))
        await phone.next("connection_established")
        acks = [await append(js, names, alert("KE-30")) for _ in range(3)]
        frames = await phone.alerts(3)  # received, never acked
        assert [f["seq"] for f in frames] == [a.seq for a in acks]
        session = session_of(running, "tunnel")
        conn = phone.ws._conn
        assert conn is not None and conn.transport is not None
        conn.transport.pause_reading()  # the tunnel: nothing more is read, nothing sent

        await eventually(session.finished.is_set, what="the silent session to end")
        assert session.closing is not None and session.closing[0] == Close.HEARTBEAT_TIMEOUT
        assert session not in running.gw.sessions
        assert session.id not in running.gw.owners.holders
        assert session.id not in running.gw.owners.claims

        async def no_reads() -> bool:
            info = await js.consumer_info(names.alerts_stream, session.consumer)
            return not info.num_waiting

        await eventually(no_reads, what="no pull request of the device left")

        back = await Client.connect(running.ws_url, token("tunnel", ("KE",)))
        hello = await back.next("connection_established")
        assert hello["pending"] == 3
        again = await back.alerts(3, ack=True)
        assert [f["seq"] for f in again] == [a.seq for a in acks]
        assert all(f["redelivered"] for f in again)
        await back.close()
        phone.ws._conn = None  # aborted by the gateway: nothing to close on this side
        await phone.session.close()
    finally:
        await running.stop()


async def test_a_reader_that_stops_reading_is_cut_off_by_its_send_buffer(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """A client that goes on sending (bare pongs) but reads nothing, with a 4 KiB receive
    buffer, and a burst of ~450 KB for it (ack_mode=auto: each alert written counts as
    delivered, so the window does not stop the sender). The socket's send buffer is bounded
    (TOCSIN_WS_SEND_BUFFER_KIB): the sender blocks once it is full, and two heartbeats later
    the session is closed with 4008, instead of the kernel holding everything (with its
    autotuning, up to 4 MiB per socket: the burst would fit, and nothing would end it)."""
    running = await start_gateway(
        make_settings(heartbeat_seconds=HEARTBEAT, ws_send_buffer_kib=64, max_inflight=64)
    )

    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_window(4096)))
    try:
        params = {"auth_token": token("stuck", ("UG",)), "ack_mode": "auto"}
        ws = await http.ws_connect(running.ws_url, params=params, autoping=False)
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "connection_established"
        session = session_of(running, "stuck")
        sock = session.transport.get_extra_info("socket") if session.transport else None
        assert sock is not None
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 64 * 1024  # Linux x2
        async with reading_stopped(ws, session, every=HEARTBEAT / 3):
            for i in range(60):
                await append(js, names, alert("UG-1", message=f"{i} " + "x" * 7500))
            await eventually(session.finished.is_set, timeout=30, what="the stuck reader cut off")
            assert session.closing is not None and session.closing[0] == Close.SLOW_CLIENT
            assert session.frames_written < 61  # it was cut while the burst was still unsent
    finally:
        await http.close()
        await running.stop()
