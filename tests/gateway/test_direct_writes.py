"""Frames written straight from the live feed (Session._write_now) give way to the sender
whenever the socket is behind: order holds across the switch, and a client that stops
reading is still cut off (4008) with acks by the client, where the direct path is on."""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
from nats.js import JetStreamContext

from tocsin.bench.netem import small_window
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.schemas.codes import Close

from ..support import (
    alert,
    append,
    eventually,
    reading_stopped,
    session_of,
    start_gateway,
    token,
)

HEARTBEAT = 0.5
BURST = 60  # alerts of ~7.5 KB: ~450 KB, more than the socket's buffers hold
BIG = "x" * 7500


async def test_a_burst_past_the_socket_buffers_arrives_in_order_through_the_sender(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """The client stops reading: the first frames go straight to the socket, then the
    transport buffers and the rest queue for the sender. Once it reads again, it gets
    every alert once, in publish order."""
    running = await start_gateway(make_settings(ws_send_buffer_kib=64, max_inflight=64))
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_window(4096)))
    try:
        ws = await http.ws_connect(running.ws_url, params={"auth_token": token("lena", ("UG",))})
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "connection_established"
        session = session_of(running, "lena")
        assert session.direct  # ack_mode=client, no compression: the direct path is on
        conn = ws._conn
        assert conn is not None and conn.transport is not None
        conn.transport.pause_reading()
        seqs = [
            (await append(js, names, alert("UG-1", message=f"{i} {BIG}"))).seq for i in range(BURST)
        ]
        # Both ways were taken: frames were written straight, and some wait for the sender.
        await eventually(
            lambda: session.frames_written > 1 and bool(session.out or session.writing),
            timeout=20,
            what="frames queued for the sender behind the direct writes",
        )
        conn.transport.resume_reading()
        got: list[int] = []
        while len(got) < BURST:
            msg = await ws.receive(timeout=20)
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            frame = json.loads(msg.data)
            if frame["type"] == "alert":
                got.append(frame["seq"])
                assert not frame["redelivered"]
        assert got == seqs
        await ws.send_str(json.dumps({"type": "ack", "seq": seqs[-1]}))
        await eventually(lambda: session.window.floor == seqs[-1], what="the last ack applied")
        await ws.close()
    finally:
        await http.close()
        await running.stop()


async def test_a_client_acking_mode_reader_that_stops_reading_is_closed_4008(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """As test_dead_links' stuck reader, with acks by the client: the direct path must not
    hand the kernel's refusal to the transport's unbounded buffer (the sender would never
    block, and nothing would close the session)."""
    running = await start_gateway(
        make_settings(heartbeat_seconds=HEARTBEAT, ws_send_buffer_kib=64, max_inflight=64)
    )
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(socket_factory=small_window(4096)))
    try:
        ws = await http.ws_connect(
            running.ws_url, params={"auth_token": token("mira", ("UG",))}, autoping=False
        )
        hello = await ws.receive_json(timeout=10)
        assert hello["type"] == "connection_established"
        session = session_of(running, "mira")
        assert session.direct
        async with reading_stopped(ws, session, every=HEARTBEAT / 3):
            for i in range(BURST):
                await append(js, names, alert("UG-1", message=f"{i} {BIG}"))
            await eventually(session.finished.is_set, timeout=30, what="the stuck reader cut off")
            assert session.closing is not None and session.closing[0] == Close.SLOW_CLIENT
    finally:
        await http.close()
        await running.stop()
