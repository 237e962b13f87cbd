"""The bench load generator: its frame parser, and its worker processes over real sockets.

The parser is fed bytes directly (every split point, deterministic); the processes talk to
a small aiohttp server started here and to the real gateway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import zlib
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Generator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import WSMsgType, web
from nats.js import JetStreamContext
from websockets.frames import Frame, Opcode

from tocsin.bench.loadgen import (
    DEFLATE,
    ENGINEIO,
    MASK,
    ClientSpec,
    LoadGen,
    WsClient,
    alert_key,
    client_frame,
    mask_payload,
)
from tocsin.bench.loadgen import Worker as LoadWorker
from tocsin.core.embedded import free_port
from tocsin.core.naming import Names
from tocsin.gateway.live import alert_frame

from ..support import RunningGateway, alert, append, eventually, token

pytestmark = pytest.mark.timeout(30)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
REFUSAL = {"error": "invalid_signature", "detail": "the token's signature does not verify"}


# ---------------------------------------------------------------- frames, built by hand


def server_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """An unmasked server frame, with the shortest length encoding."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 65536:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


def tocsin_alert(seq: int, alert_id: int | str, pad: int = 0) -> bytes:
    """The gateway's alert frame (``alert_frame``) around an alert body of some size."""
    body = {"alert_id": alert_id, "alert_level": "high", "title": "t", "message": "m" * pad}
    return alert_frame(seq, orjson.dumps(body), False)


def parse_client_frames(data: bytes) -> list[Frame]:
    """Client frames as a strict server reads them (websockets insists on the mask)."""
    frames = []
    buf = bytearray(data)

    def read_exact(n: int) -> Generator[None, None, bytes]:
        if len(buf) < n:
            raise EOFError
        chunk = bytes(buf[:n])
        del buf[:n]
        return chunk
        yield  # a generator, as Frame.parse wants

    while buf:
        gen = Frame.parse(read_exact, mask=True)
        try:
            next(gen)
        except StopIteration as done:
            frames.append(done.value)
    return frames


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def opened_client(
    ack: bool = True, ack_interval: float = 0.0
) -> tuple[WsClient, LoadWorker, FakeTransport]:
    """A client past its handshake, on a fake transport, in a worker of this process."""
    w = LoadWorker("127.0.0.1", 1, "asyncio", 0, ack_interval)
    client = WsClient(w, 7, "/ws?client_id=x", ack)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    request = bytes(transport.written)
    assert request.startswith(b"GET /ws?client_id=x HTTP/1.1\r\n")
    key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    transport.written.clear()
    client.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    return client, w, transport


def opened_peer_client(
    flags: int, extensions: str = ""
) -> tuple[WsClient, LoadWorker, FakeTransport]:
    """A client with ``flags`` (Engine.IO, deflate offered) past its handshake, the server
    answering with ``extensions``."""
    w = LoadWorker("127.0.0.1", 1, "asyncio", 0)
    client = WsClient(w, 3, "/socket.io/?EIO=4&transport=websocket", True, flags)
    transport = FakeTransport()
    client.connection_made(transport)  # type: ignore[arg-type]
    request = bytes(transport.written)
    offered = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    assert (offered in request) == bool(flags & DEFLATE)
    key = request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    transport.written.clear()
    ext = f"Sec-WebSocket-Extensions: {extensions}\r\n".encode() if extensions else b""
    client.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n" + ext + b"\r\n"
    )
    return client, w, transport


def sent_texts(transport: FakeTransport) -> list[bytes]:
    texts = [bytes(f.data) for f in parse_client_frames(bytes(transport.written))]
    transport.written.clear()
    return texts


def test_the_engine_io_client_connects_answers_pings_reads_alerts_and_acks() -> None:
    client, w, transport = opened_peer_client(ENGINEIO)
    client.data_received(server_frame(b'0{"sid":"s1","pingInterval":25000,"pingTimeout":20000}'))
    assert sent_texts(transport) == [b"40"]  # connect to the main namespace
    assert w.open == 0
    client.data_received(server_frame(b'40{"sid":"n1","pid":"p1"}'))
    assert w.open == 1 and client.t_established
    client.data_received(server_frame(b"2"))
    assert sent_texts(transport) == [b"3"] and w.pings == 1
    frames = [server_frame(b'42["alert",' + tocsin_alert(s, 100 + s) + b',"off"]') for s in (1, 2)]
    client.data_received(b"".join(frames))
    assert list(w.ids) == [101, 102] and w.alerts == 2
    assert sent_texts(transport) == [b'42["ack",2]']  # one cumulative ack for the read


def test_compressed_frames_are_inflated_when_the_server_accepted_deflate() -> None:
    client, w, transport = opened_peer_client(
        DEFLATE, "permessage-deflate; server_no_context_takeover"
    )
    assert w.deflate_accepted == 1
    payloads = [b'{"type":"connection_established","pending":0}', tocsin_alert(5, 905)]
    for payload in payloads:
        deflate = zlib.compressobj(wbits=-15)
        body = deflate.compress(payload) + deflate.flush(zlib.Z_SYNC_FLUSH)
        assert body.endswith(b"\x00\x00\xff\xff")
        client.data_received(bytes([0xC1, len(body[:-4])]) + body[:-4])  # FIN, RSV1, text
    assert w.open == 1 and list(w.ids) == [905] and w.inflated == 2
    assert sent_texts(transport) == [b'{"type":"ack","seq":5}']


def test_deflate_accepted_without_an_offer_is_a_failure() -> None:
    _, w, transport = opened_peer_client(0, "permessage-deflate")
    assert transport.closed and w.deflate_accepted == 0


def test_client_frames_are_masked_as_rfc_6455_says() -> None:
    assert mask_payload(mask_payload(b"hello, world")) == b"hello, world"
    assert mask_payload(b"\x00\x00\x00\x00\x00") == MASK + MASK[:1]
    for size in (0, 5, 125, 126, 300, 65535, 65536, 70_000):
        payload = bytes(i % 251 for i in range(size))
        [frame] = parse_client_frames(client_frame(payload, 2))
        assert frame.opcode is Opcode.BINARY and frame.fin and frame.data == payload


def test_the_parser_reads_every_kind_of_frame_whatever_the_split() -> None:
    ping_payload = b'{"type":"ping","ts":1764064800.123}'
    established = b'{"type":"connection_established","client_id":"x","pending":0}'
    fragmented = tocsin_alert(12, 1012)
    stream = b"".join(
        [
            server_frame(established),
            server_frame(tocsin_alert(10, 1010)),  # 7-bit length
            server_frame(tocsin_alert(11, "ext-11", pad=200)),  # 16-bit, a string id
            server_frame(fragmented[:20], fin=False),  # a message in three fragments,
            server_frame(b"ping!", opcode=9),  # with a protocol ping between them
            server_frame(fragmented[20:50], opcode=0, fin=False),
            server_frame(fragmented[50:], opcode=0),
            server_frame(tocsin_alert(13, 1013, pad=70_000)),  # 64-bit length
            server_frame(ping_payload),
            server_frame(b'{"seq": 14, "type": "alert", "alert": {"alert_id": 1014}}'),
            server_frame(b'{"type":"connection_stats","acked_seq":0}'),
            server_frame(b"\x01\x02", opcode=2),
        ]
    )
    expected_ids = [1010, alert_key("ext-11"), 1012, 1013, 1014]
    for chunk in (len(stream), 1, 2, 3, 7, 125, 4096):
        client, w, transport = opened_client()
        for i in range(0, len(stream), chunk):
            piece = stream[i : i + chunk]
            if chunk % 2:  # as the loop does it: into the worker's shared read buffer
                w.rview[: len(piece)] = piece
                client.buffer_updated(len(piece))
                w.rview[: len(piece)] = b"\xff" * len(piece)  # nothing may point into it
            else:
                client.data_received(piece)
        assert list(w.ids) == expected_ids, chunk
        assert set(w.client_idx) == {7}
        assert list(w.times) == sorted(w.times)
        assert w.received() == 5 and w.open == 1 and client.buf is None
        sent = parse_client_frames(bytes(transport.written))
        pongs = [f for f in sent if f.opcode is Opcode.PONG]
        assert [f.data for f in pongs] == [b"ping!"]
        texts = [orjson.loads(f.data) for f in sent if f.opcode is Opcode.TEXT]
        assert {"type": "pong", "ts": 1764064800.123} in texts
        acks = [t["seq"] for t in texts if t["type"] == "ack"]
        assert acks == sorted(set(acks)) and acks[-1] == 14  # cumulative, increasing
        pong_text = [f.data for f in sent if bytes(f.data).startswith(b'{"type":"pong"')]
        assert pong_text == [b'{"type":"pong","ts":1764064800.123}']  # ts bytes copied
        assert w.decoded_types() == {
            "alert": 5,
            "connection_established": 1,
            "ping": 1,
            "connection_stats": 1,
            "(binary)": 1,
        }
        # A close frame from the server is answered with the same code and recorded.
        transport.written.clear()
        client.data_received(server_frame((4009).to_bytes(2, "big") + b"replaced", opcode=8))
        [answer] = parse_client_frames(bytes(transport.written))
        assert answer.opcode is Opcode.CLOSE and answer.data[:2] == (4009).to_bytes(2, "big")
        client.connection_lost(None)
        assert w.closed == {4009: 1} and w.open == 0 and not w.clients


def test_one_ack_per_read_and_none_without_acks() -> None:
    client, _, transport = opened_client(ack=True)
    client.data_received(server_frame(b'{"type":"connection_established"}'))
    client.data_received(b"".join(server_frame(tocsin_alert(s, s)) for s in (3, 5, 4)))
    [ack] = parse_client_frames(bytes(transport.written))
    assert orjson.loads(ack.data) == {"type": "ack", "seq": 5}
    transport.written.clear()
    client.data_received(server_frame(tocsin_alert(2, 2)))  # a resend below the ack
    assert not transport.written
    silent, w, transport = opened_client(ack=False)
    silent.data_received(server_frame(b'{"type":"connection_established"}'))
    silent.data_received(server_frame(tocsin_alert(3, 3)))
    assert not transport.written and w.received() == 1


async def test_acks_can_be_coalesced_over_an_interval() -> None:
    client, w, transport = opened_client(ack_interval=0.05)
    client.data_received(server_frame(b'{"type":"connection_established"}'))
    client.data_received(server_frame(tocsin_alert(3, 3)))
    client.data_received(server_frame(tocsin_alert(5, 5)))
    assert not transport.written  # not yet: one ack per interval
    await eventually(lambda: bool(transport.written), timeout=5, what="the coalesced ack")
    [ack] = parse_client_frames(bytes(transport.written))
    assert orjson.loads(ack.data) == {"type": "ack", "seq": 5} and w.acks == 1


# ---------------------------------------------------------------- a small aiohttp server


@dataclass
class BareServer:
    port: int = 0
    sockets: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    transports: dict[str, Any] = field(default_factory=dict)
    acked: dict[str, int] = field(default_factory=dict)
    ack_order_ok: bool = True
    pongs: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    others: list[str] = field(default_factory=list)
    closed: dict[str, int | None] = field(default_factory=dict)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if "refuse" in request.query:
            return web.json_response(REFUSAL, status=401)
        cid = request.query["client_id"]
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[cid] = ws
        self.transports[cid] = request.transport
        hello = {"type": "connection_established", "client_id": cid}
        await ws.send_frame(orjson.dumps(hello), WSMsgType.TEXT)
        async for msg in ws:
            assert msg.type is WSMsgType.TEXT
            frame = orjson.loads(msg.data)
            if frame["type"] == "ack":
                if frame["seq"] <= self.acked.get(cid, 0):
                    self.ack_order_ok = False
                self.acked[cid] = frame["seq"]
            elif frame["type"] == "pong":
                self.pongs[cid].append(msg.data)
            else:
                self.others.append(msg.data)
        self.closed[cid] = ws.close_code
        del self.sockets[cid]
        return ws

    async def broadcast(self, frame: bytes) -> None:
        for ws in list(self.sockets.values()):
            await ws.send_frame(frame, WSMsgType.TEXT)


@pytest.fixture
async def server() -> AsyncIterator[BareServer]:
    srv = BareServer()
    app = web.Application()
    app.router.add_get("/ws", srv.handler)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    srv.port = free_port()
    await web.TCPSite(runner, "127.0.0.1", srv.port).start()
    yield srv
    await runner.cleanup()


@contextlib.asynccontextmanager
async def loadgen(port: int, processes: int = 2) -> AsyncIterator[LoadGen]:
    lg = LoadGen("127.0.0.1", port, processes)
    try:
        await asyncio.wait_for(lg.start(), 20)
        yield lg
    finally:
        await asyncio.wait_for(lg.stop(timeout=5), 25)


def receipts_by_client(alert_ids: Any, recv_ns: Any, clients: Any) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = defaultdict(list)
    for aid, ns, idx in zip(alert_ids, recv_ns, clients, strict=True):
        out[idx].append((aid, ns))
    return out


async def test_broadcast_acks_pings_and_close_codes(server: BareServer) -> None:
    n, alerts = 50, 20
    specs = [ClientSpec(f"/ws?client_id=c{i}", ack=i % 10 != 9) for i in range(n)]
    async with loadgen(server.port) as lg:
        usage = await lg.usage()
        assert len(usage) == 2 and len({u.pid for u in usage}) == 2
        assert all(u.loop in ("uvloop", "asyncio") and u.fd_limit >= 1024 for u in usage)
        result = await lg.connect(specs, concurrency=16, timeout=15)
        assert (result.ok, result.failed, result.failures) == (n, 0, {})
        assert len(result.established_ms) == n and all(ms > 0 for ms in result.established_ms)
        assert result.clients == list(range(n)) and len(result.started_ns) == n
        assert len(server.sockets) == n

        for k in range(alerts):  # seq 100, 103, ...: with gaps, as tocsin's
            await server.broadcast(tocsin_alert(100 + 3 * k, 5000 + k))
        await eventually(
            lambda: _equals(lg.received(), n * alerts), timeout=15, what="every receipt"
        )
        got = await lg.collect()
        assert len(got) == n * alerts
        assert got.frames == {"alert": n * alerts, "connection_established": n}
        per_client = receipts_by_client(got.alert_ids, got.recv_ns, got.clients)
        assert sorted(per_client) == list(range(n))
        for rows in per_client.values():
            assert [aid for aid, _ in rows] == [5000 + k for k in range(alerts)]
            assert [ns for _, ns in rows] == sorted(ns for _, ns in rows)
        assert len(await lg.collect()) == 0  # cleared
        assert await lg.received() == n * alerts  # not cleared

        last = 100 + 3 * (alerts - 1)
        acking = {f"c{i}" for i in range(n) if specs[i].ack}
        await eventually(
            lambda: all(server.acked.get(c) == last for c in acking), what="cumulative acks"
        )
        assert set(server.acked) == acking and server.ack_order_ok and not server.others

        await server.broadcast(b'{"type":"ping","ts":1764064800.123}')
        await eventually(lambda: len(server.pongs) == n, what="pongs")
        assert all(p == ['{"type":"pong","ts":1764064800.123}'] for p in server.pongs.values())
        status = await lg.status()
        assert status.pings_answered == n and status.open == n and status.closed == {}
        assert status.acks_sent >= len(acking)

        replaced = [f"c{i}" for i in range(10)]
        for cid in replaced:
            await server.sockets[cid].close(code=4009, message=b"replaced")
        await eventually(
            lambda: _status(lg, lambda s: s.closed == {4009: 10} and s.open == n - 10),
            what="4009 recorded",
        )
        await lg.close_all(timeout=10, clients=[10, 11, 12])  # some, by client index
        status = await lg.status()
        assert status.open == n - 13 and status.closed == {4009: 10, 1000: 3}
        await lg.close_all(timeout=10)
        status = await lg.status()
        assert status.open == 0 and status.closed == {4009: 10, 1000: n - 10}
        await eventually(lambda: len(server.closed) == n, what="server saw every close")
        assert all(server.closed[f"c{i}"] == 1000 for i in range(10, n))


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return (await value) == expected


async def _status(lg: LoadGen, check: Any) -> bool:
    return bool(check(await lg.status()))


async def test_refused_handshakes_are_failures_with_their_reason(server: BareServer) -> None:
    specs = [ClientSpec(f"/ws?client_id=r{i}&refuse=1") for i in range(3)]
    specs += [ClientSpec(f"/ws?client_id=ok{i}") for i in range(2)]
    async with loadgen(server.port) as lg:
        result = await lg.connect(specs, timeout=10)
        assert (result.ok, result.failed) == (2, 3)
        body = json.dumps(REFUSAL)  # as web.json_response writes it
        assert result.failures == {f"HTTP 401: {body}": 3}
        assert len(result.established_ms) == 2
    async with loadgen(free_port(), processes=1) as lg:  # nothing listens there
        result = await lg.connect([ClientSpec("/ws?client_id=x")], timeout=10)
        [(reason, count)] = result.failures.items()
        assert result.failed == 1 and count == 1 and reason.startswith("connect: Connection")


async def test_long_and_fragmented_frames_over_a_socket(server: BareServer) -> None:
    async with loadgen(server.port, processes=1) as lg:
        result = await lg.connect([ClientSpec(f"/ws?client_id=f{i}") for i in range(3)])
        assert result.ok == 3
        await server.broadcast(tocsin_alert(1, 1, pad=200))  # 16-bit length
        await server.broadcast(tocsin_alert(2, 2, pad=70_000))  # 64-bit length
        third = tocsin_alert(3, "three")
        pieces = [
            server_frame(third[:10], fin=False),
            server_frame(b'{"type":"ping","ts":5}'),  # a whole message between fragments
            server_frame(third[10:11], opcode=0, fin=False),
            server_frame(third[11:], opcode=0),
        ]
        for transport in server.transports.values():  # raw bytes, behind aiohttp's back
            for piece in pieces:
                transport.write(piece)
                await asyncio.sleep(0)
        await eventually(lambda: _equals(lg.received(), 9), what="receipts")
        got = await lg.collect()
        per_client = receipts_by_client(got.alert_ids, got.recv_ns, got.clients)
        assert all(
            [aid for aid, _ in rows] == [1, 2, alert_key("three")] for rows in per_client.values()
        )
        assert len(per_client) == 3
        await eventually(lambda: all(server.acked.get(c) == 3 for c in server.sockets), what="acks")
        await eventually(lambda: len(server.pongs) == 3, what="pongs")
        assert {p[0] for p in server.pongs.values()} == {'{"type":"pong","ts":5}'}


# ---------------------------------------------------------------- the real gateway


async def test_against_the_gateway_everyone_gets_everything_and_acks_move_the_floor(
    gateway: RunningGateway, js: JetStreamContext, names: Names
) -> None:
    devices = 20
    base = "/api/v1/alerts/ws?auth_token={}&client_id=d{}&ack_mode=client"
    specs = [ClientSpec(base.format(token(f"lg{i}"), i)) for i in range(devices)]
    async with loadgen(gateway.port) as lg:
        result = await lg.connect(specs, concurrency=8, timeout=20)
        assert (result.ok, result.failures) == (devices, {})
        sent = [await append(js, names, alert("KE-30")) for _ in range(5)]
        await eventually(
            lambda: _equals(lg.received(), devices * 5), timeout=15, what="every delivery"
        )
        got = await lg.collect()
        per_client = receipts_by_client(got.alert_ids, got.recv_ns, got.clients)
        assert len(per_client) == devices
        ids = sorted(set(got.alert_ids))
        assert len(ids) == 5 and all(
            sorted(aid for aid, _ in rows) == ids for rows in per_client.values()
        )
        last = sent[-1].seq

        async def floors_moved() -> bool:  # saved: in the queue, or in the positions journal
            gw = gateway.gw
            for i in range(devices):
                consumer = names.device_consumer(f"lg{i}", f"d{i}")
                info = await js.consumer_info(names.alerts_stream, consumer)
                if info.ack_floor is not None and info.ack_floor.stream_seq == last:
                    continue
                journaled = await gw.journal.read(gw.instance, consumer)
                if journaled is None or journaled.floor != last:
                    return False
            return True

        await eventually(floors_moved, timeout=10, what="ack floors at the last seq")
        assert (await lg.status()).acks_sent >= devices
