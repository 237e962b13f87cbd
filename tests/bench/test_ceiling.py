"""The ceiling broadcaster (issue 4) as a real process: tocsin's frames, byte for byte.

``python -m tocsin.bench.ceiling`` runs on a free port; aiohttp clients connect to
tocsin's WebSocket path, the test broadcasts over HTTP, and every frame must be what
tocsin's gateway would send: the alert frame byte-identical to ``alert_frame``, the
handshake and pings valid under tocsin's server-frame schema.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from tocsin.bench.ceiling import command
from tocsin.core.embedded import free_port, stop_process, wait_for_port
from tocsin.gateway.live import alert_frame
from tocsin.ingest.pipeline import encode_alert
from tocsin.schemas import Alert, AlertFrame, ConnectionEstablished, Ping, server_frame_adapter

HEARTBEAT = 0.3
DEADLINE = 5.0


class Ceiling:
    def __init__(self, heartbeat: float = HEARTBEAT) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            command("127.0.0.1", self.port, heartbeat),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_for_port("127.0.0.1", self.port, 15, alive=self.proc)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        assert self.proc.stdout is not None
        self.banner = self.proc.stdout.readline().decode().strip()
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/v1/alerts/ws"

    def stop(self, timeout: float = 10) -> int | None:
        return stop_process(self.proc, timeout)


@pytest.fixture
def ceiling() -> Iterator[Ceiling]:
    c = Ceiling()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def alert_body(n: int, region: str = "KE-30") -> bytes:
    """An alert as tocsin stores it in ALERTS (and sends it inside ``alert`` frames)."""
    return encode_alert(
        Alert.model_validate(
            {
                "alert_id": n,
                "alert_level": "high",
                "alert_type": "outbreak_risk",
                "title": "Malaria outbreak risk rising",
                "message": "Risk model predicts a rise in cases",
                "priority": "urgent",
                "location": {"region": region, "lat": -0.5, "lon": 34.5},
                "risk_score": 0.8,
            }
        )
    )


async def connect(
    http: aiohttp.ClientSession, c: Ceiling, client_id: str, ack_mode: str = "client"
) -> tuple[aiohttp.ClientWebSocketResponse, ConnectionEstablished]:
    query = {"auth_token": "not-checked", "client_id": client_id, "ack_mode": ack_mode}
    ws = await http.ws_connect(c.ws_url, params=query)
    hello = server_frame_adapter.validate_json(await raw_frame(ws))
    assert isinstance(hello, ConnectionEstablished)
    return ws, hello


async def raw_frame(ws: aiohttp.ClientWebSocketResponse, skip_pings: bool = False) -> bytes:
    while True:
        async with asyncio.timeout(DEADLINE):
            msg = await ws.receive()
        assert msg.type is aiohttp.WSMsgType.TEXT, msg
        data: bytes = msg.data.encode()
        if not (skip_pings and data.startswith(b'{"type":"ping"')):
            return data


async def healthz(http: aiohttp.ClientSession, c: Ceiling) -> dict[str, Any]:
    async with http.get(f"{c.http}/healthz") as resp:
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def test_handshake_and_broadcast_are_tocsins_frames(
    ceiling: Ceiling, http: aiohttp.ClientSession
) -> None:
    assert ceiling.banner == f"ceiling listening on 127.0.0.1:{ceiling.port}"
    clients = []
    for i, mode in enumerate(("client", "auto", "client")):
        ws, hello = await connect(http, ceiling, f"phone-{i}", mode)
        assert (hello.client_id, hello.ack_mode) == (f"phone-{i}", mode)
        assert hello.pending == 0 and hello.heartbeat_interval == HEARTBEAT
        clients.append(ws)
    assert await healthz(http, ceiling) == {"sockets": 3}

    body = alert_body(1)
    async with http.post(f"{ceiling.http}/broadcast", data=body) as resp:
        assert resp.status == 200
        assert await resp.json() == {"seq": 1, "sockets": 3}
    for ws in clients:
        frame = await raw_frame(ws, skip_pings=True)
        assert frame == alert_frame(1, body, False)  # byte for byte what tocsin sends
        parsed = server_frame_adapter.validate_json(frame)
        assert isinstance(parsed, AlertFrame)
        assert parsed.seq == 1 and not parsed.redelivered
        assert parsed.alert == Alert.model_validate_json(body)
        # acks and pongs are read and dropped; the socket stays open
        await ws.send_str('{"type":"ack","seq":1}')
        await ws.send_str('{"type":"pong","ts":1.0}')

    # a batch: seqs go on in order, each alert encoded compactly
    batch = [orjson.loads(alert_body(n)) for n in (2, 3, 4)]
    async with http.post(f"{ceiling.http}/broadcast?count=3", data=orjson.dumps(batch)) as resp:
        assert resp.status == 200
        assert await resp.json() == {"seq": 4, "first_seq": 2, "count": 3, "sockets": 3}
    for ws in clients:
        for seq, a in zip((2, 3, 4), batch, strict=True):
            assert await raw_frame(ws, skip_pings=True) == alert_frame(seq, orjson.dumps(a), False)

    for bad in ("count=2", "count=x"):
        async with http.post(f"{ceiling.http}/broadcast?{bad}", data=orjson.dumps(batch)) as resp:
            assert resp.status == 400

    # a client that leaves is no longer written to
    await clients.pop().close()
    async with asyncio.timeout(DEADLINE):
        while (await healthz(http, ceiling))["sockets"] != 2:
            await asyncio.sleep(0.02)
    async with http.post(f"{ceiling.http}/broadcast", data=alert_body(5)) as resp:
        assert await resp.json() == {"seq": 5, "sockets": 2}
    for ws in clients:
        assert await raw_frame(ws, skip_pings=True) == alert_frame(5, alert_body(5), False)
        await ws.close()


async def test_pings_every_heartbeat(ceiling: Ceiling, http: aiohttp.ClientSession) -> None:
    ws, _ = await connect(http, ceiling, "phone")
    loop = asyncio.get_running_loop()
    start = loop.time()
    pings = []
    for _ in range(2):
        ping = server_frame_adapter.validate_json(await raw_frame(ws))
        assert isinstance(ping, Ping)
        pings.append(ping.ts)
        await ws.send_str(orjson.dumps({"type": "pong", "ts": ping.ts}).decode())
    assert pings[0] < pings[1]
    assert loop.time() - start >= HEARTBEAT * 1.5  # paced, not a flood
    await ws.close()


async def test_sigterm_closes_the_sockets_and_exits_cleanly(
    ceiling: Ceiling, http: aiohttp.ClientSession
) -> None:
    ws, _ = await connect(http, ceiling, "phone")
    ceiling.proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(DEADLINE):
        while (msg := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
            pass  # a ping may come first
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == aiohttp.WSCloseCode.GOING_AWAY
    await ws.close()
    assert await asyncio.to_thread(ceiling.proc.wait, DEADLINE) == 0
