"""The load generator of ``tocsin bench``: many lean WebSocket clients in a few processes.

A load generator written in Python, on the same cores as the system it measures, is
easily the bottleneck itself (issue 4). So this one is built to stay out of the way:

- Each client is one :class:`WsClient`, an :class:`asyncio.BufferedProtocol` with
  ``__slots__``: no aiohttp or ``websockets`` client, no reader task, no per-frame task or
  future. It speaks just enough RFC 6455: the HTTP/1.1 Upgrade, unmasked server frames
  (7-, 16- and 64-bit lengths, fragments, close, ping, pong) and masked client frames.
  Every read of a worker lands in one shared buffer and is parsed at once.
- An ``alert`` frame as tocsin writes it (:func:`tocsin.gateway.live.alert_frame`) is
  recognised and read with one precompiled bytes regex, without JSON parsing and without
  copying the payload; ``(alert_id, client, time.monotonic_ns())`` go into three
  ``array`` columns of the worker process. All frames of one read share one timestamp
  (they arrived together) and one cumulative ``ack``.
- Clients live in a few worker processes (``multiprocessing`` "spawn": the parent runs
  an asyncio loop and must not fork it), each with one event loop (uvloop if importable).
  The parent talks to them over Pipes, read by one thread per worker so that the
  orchestrator's loop never blocks.

Timestamps are ``CLOCK_MONOTONIC`` (``time.monotonic_ns()``), one clock for every process
of the machine: a publisher in the parent subtracts its own ``time.monotonic_ns()``.

Usage (from the orchestrator's event loop)::

    async with LoadGen("127.0.0.1", port, processes=2) as lg:
        result = await lg.connect([ClientSpec(f"/api/v1/alerts/ws?auth_token={t}&client_id=d{i}")
                                   for i, t in enumerate(tokens)])
        ...  # publish
        while await lg.received() < expected: await asyncio.sleep(0.05)
        receipts = await lg.collect()
        usage = await lg.usage()
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import json
import multiprocessing
import os
import re
import resource
import signal
import sys
import threading
import time
import traceback
import types
import zlib
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from tocsin.core.supervisor import raise_fd_limit

try:  # pragma: no cover - depends on the environment
    import uvloop  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment, unused-ignore]

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

# ---------------------------------------------------------------- client frames (masked)

#: One mask key per process. RFC 6455 asks for an unpredictable key per frame to defeat
#: cache poisoning by hostile scripts in browsers; a load generator on loopback has no
#: such adversary, and a fixed key lets the XOR stream be computed once.
MASK = os.urandom(4)
_MASK_STREAM = MASK * 4096  # 16 KiB: every client frame this module sends is shorter

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


def mask_payload(payload: bytes, mask: bytes = MASK) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (the same operation unmasks)."""
    n = len(payload)
    if not n:
        return b""
    stream = _MASK_STREAM if mask == MASK and n <= len(_MASK_STREAM) else mask * (n // 4 + 1)
    key = int.from_bytes(stream[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


#: Precomputed for the frames sent most (acks, pongs: text, under 126 bytes): the header
#: with the mask key, and the mask stream as an int, per payload length.
_TEXT_HEADS = [bytes((0x81, 0x80 | n)) + MASK for n in range(126)]
_MASK_INTS = [int.from_bytes(_MASK_STREAM[:n], "big") for n in range(126)]


def text_frame(payload: bytes) -> bytes:
    """A short (< 126 bytes) masked text frame, the fast way."""
    n = len(payload)
    return _TEXT_HEADS[n] + (int.from_bytes(payload, "big") ^ _MASK_INTS[n]).to_bytes(n, "big")


def client_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """One complete (FIN) client frame, masked with :data:`MASK`."""
    n = len(payload)
    if n < 126:
        if opcode == OP_TEXT:
            return text_frame(payload)
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + MASK + mask_payload(payload)


def close_frame(code: int) -> bytes:
    return client_frame(code.to_bytes(2, "big"), OP_CLOSE)


# ---------------------------------------------------------------- server frames (parsing)

ALERT_PREFIX = b'{"type":"alert"'
#: tocsin's alert frame, exactly as ``alert_frame`` writes it around the stored alert JSON
#: (whose first key is ``alert_id``): int ids in group 2, string ids in group 3.
ALERT_RE = re.compile(
    rb'\{"type":"alert","seq":(\d+),"redelivered":(?:true|false),'
    rb'"alert":\{"alert_id":(?:(\d+)|"([^"\\]*)")'
)
PING_PREFIX = b'{"type":"ping"'
#: Engine.IO v4 / Socket.IO (tocsin bench peers): an event packet carrying an alert frame
#: as tocsin writes it, ``42["alert",{"type":"alert",...},"<offset>"]``.
EIO_ALERT_PREFIX = b'42["alert",'
#: What a client offers, like a browser (RFC 7692).
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
#: Client flags (ClientSpec): speak Engine.IO v4 over the socket; offer permessage-deflate.
ENGINEIO, DEFLATE = 1, 2
ESTABLISHED_PREFIX = b'{"type":"connection_established"'
TS_RE = re.compile(rb'"ts"\s*:\s*(-?[0-9][0-9.eE+-]*|null)')
TYPE_RE = re.compile(rb'\{\s*"type"\s*:\s*"([^"\\]*)"')


def alert_key(alert_id: int | str | bytes) -> int:
    """The int64 under which an alert's receipts are recorded.

    Int ids are themselves (tocsin's int ids are ≥ 1). A string id becomes a stable
    negative number (62 bits of its BLAKE2b digest), the same in every process.
    """
    if isinstance(alert_id, int):
        return alert_id
    raw = alert_id.encode() if isinstance(alert_id, str) else bytes(alert_id)
    return -1 - (int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "big") >> 2)


# ---------------------------------------------------------------- one client


#: Client states. CLOSING: our close frame is out, frames are still read (the server's
#: close answer among them). SHUT: a close frame came, or the connection failed: input is
#: ignored until the TCP connection ends.
HANDSHAKE, REFUSED, OPEN, LIVE, CLOSING, SHUT, CLOSED = range(7)


class WsClient(asyncio.BufferedProtocol):
    """One WebSocket connection; all its state is in these slots.

    The loop reads into one buffer shared by all clients of the worker (``get_buffer``),
    parsed at once in ``buffer_updated``: no bytes object per read. With asyncio's own
    loop that is about a fifth less CPU per frame than ``data_received``; with uvloop,
    about the same.
    """

    __slots__ = (
        "accept",
        "ack",
        "acked",
        "buf",
        "close_sent",
        "code",
        "eio",
        "flags",
        "frag",
        "frag_op",
        "http_status",
        "idx",
        "inflate",
        "inflate_bits",
        "need",
        "request",
        "state",
        "t_established",
        "t_start",
        "transport",
        "w",
        "waiter",
    )

    def __init__(self, w: Worker, idx: int, path_and_query: str, ack: bool, flags: int = 0) -> None:
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
        offer = f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if flags & DEFLATE else ""
        self.request = (
            f"GET {path_and_query} HTTP/1.1\r\n"
            f"Host: {w.host_header}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            f"{offer}"
            "\r\n"
        ).encode("latin-1")
        self.flags = flags
        self.eio = bool(flags & ENGINEIO)
        self.inflate: Any = None  # a zlib decompressor once the server accepted deflate
        self.inflate_bits = 0  # negative: a fresh decompressor per message (no takeover)
        self.w = w
        self.idx = idx
        self.ack = ack
        self.acked = 0
        self.buf: bytearray | None = None
        self.need = 0  # OPEN/LIVE: bytes the buffer needs; REFUSED: the Content-Length
        self.close_sent = False
        self.code = 0
        self.frag: bytearray | None = None
        self.frag_op = 0
        self.http_status = 0
        self.state = HANDSHAKE
        self.t_start = time.monotonic_ns()
        self.t_established = 0
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[str | None] | None = None

    # -------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.w.clients.add(self)
        transport.write(self.request)  # type: ignore[attr-defined]
        self.request = b""

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.w.rview

    def buffer_updated(self, nbytes: int) -> None:
        state = self.state
        if OPEN <= state <= CLOSING:
            self._frames(self.w.rbuf, nbytes)
        elif state < OPEN:
            self._handshake(bytes(self.w.rview[:nbytes]))

    def data_received(self, data: bytes) -> None:
        """As :meth:`buffer_updated`, for bytes handed over directly (tests)."""
        state = self.state
        if OPEN <= state <= CLOSING:
            self._frames(data, len(data))
        elif state < OPEN:
            self._handshake(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        w = self.w
        self.transport = None
        if self.state == REFUSED:
            self._refused(final=True)  # with the part of the body that came
        self.state = CLOSED
        self.buf = self.frag = None
        if self.t_established:
            w.open -= 1
            code = self.code or 1006
            w.closed[code] = w.closed.get(code, 0) + 1
        elif self.code:
            self._done(f"closed with {self.code} before connection_established")
        else:
            self._done("connection lost before connection_established")
        w.clients.discard(self)
        w.dirty.discard(self)
        w.closing.discard(self)
        if not w.closing and w.drained is not None and not w.drained.done():
            w.drained.set_result(None)

    # -------------------------------------------------------- frames

    def _frames(self, data: bytes | bytearray, n: int) -> None:
        """Parse every complete frame in the client's buffer plus ``data[:n]``; keep the
        rest (``data`` may be the worker's shared read buffer: nothing may point into it)."""
        buf = self.buf
        if buf is not None:
            buf += memoryview(data)[:n]
            if len(buf) < self.need:
                return
            data = buf
            n = len(buf)
            self.buf = None
        now = time.monotonic_ns()
        w = self.w
        ids = w.ids
        times = w.times
        clients = w.client_idx
        idx = self.idx
        alert_match = ALERT_RE.match
        high = 0
        alerts = 0
        pos = 0
        need = 0
        while n - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = data[pos + 2] << 8 | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            if b1 & 0x80:
                self._protocol_error("masked server frame")
                return
            end = start + length
            if end > n:
                need = end - pos
                break
            if b0 == 0x81:  # a whole text frame: the common case
                if self.eio:
                    seq = self._eio(data, start, end, now)
                    if seq > high:
                        high = seq
                    pos = end
                    continue
                m = alert_match(data, start, end)
                if m is not None:
                    seq = int(m[1])
                    if seq > high:
                        high = seq
                    aid = m[2]
                    ids.append(int(aid) if aid is not None else alert_key(m[3]))
                    times.append(now)
                    clients.append(idx)
                    alerts += 1
                else:
                    seq = self._message(bytes(data[start:end]), now)
                    if seq > high:
                        high = seq
            else:
                seq = self._frame(b0, data, start, end, now)
                if seq > high:
                    high = seq
                if self.state >= SHUT:
                    break
            pos = end
        if pos < n and self.state <= CLOSING:
            self.buf = bytearray(data[pos:n])
            self.need = need
        w.alerts += alerts
        w.frames += alerts
        if high > self.acked and self.ack and self.state == LIVE:
            self.acked = high
            if w.ack_interval:
                w.ack_later(self)
            else:
                self.transport.write(self.ack_frame(high))  # type: ignore[union-attr]
                w.acks += 1

    def ack_frame(self, seq: int) -> bytes:
        """A cumulative ack: tocsin's frame, or a Socket.IO ``ack`` event to the peer."""
        return text_frame((b'42["ack",%d]' if self.eio else b'{"type":"ack","seq":%d}') % seq)

    def _text(self, text: bytes, now: int) -> int:
        """A whole text message off the fast path (inflated, or reassembled)."""
        if self.eio:
            return self._eio(text, 0, len(text), now)
        m = ALERT_RE.match(text)
        if m is None:
            return self._message(text, now)
        w = self.w
        aid = m[2]
        w.ids.append(int(aid) if aid is not None else alert_key(m[3]))
        w.times.append(now)
        w.client_idx.append(self.idx)
        w.alerts += 1
        w.frames += 1
        return int(m[1])

    def _eio(self, data: bytes | bytearray, start: int, end: int, now: int) -> int:
        """One Engine.IO v4 packet (Socket.IO over it); returns the seq of an alert."""
        w = self.w
        kind = data[start] if end > start else 0
        if kind == 0x34:  # "4": a Socket.IO packet
            if data[start : start + 11] == EIO_ALERT_PREFIX:
                m = ALERT_RE.match(data, start + 11, end)
                if m is not None:
                    aid = m[2]
                    w.ids.append(int(aid) if aid is not None else alert_key(m[3]))
                    w.times.append(now)
                    w.client_idx.append(self.idx)
                    w.alerts += 1
                    w.frames += 1
                    return int(m[1])
                w.count(b"(unreadable)")
                return 0
            sub = data[start + 1] if end > start + 1 else 0
            if sub == 0x30:  # "40{...}": connected to the namespace
                self._established(now)
                w.count(b"connection_established")
            elif sub == 0x34:  # "44": connect error
                w.count(b"(socket.io connect error)")
                self._fail(f"socket.io: {bytes(data[start:end])[:200]!r}")
            else:
                w.count(b"(socket.io packet)")
            return 0
        if kind == 0x32:  # "2": ping; the answer is "3"
            self.transport.write(text_frame(b"3"))  # type: ignore[union-attr]
            w.pings += 1
            w.count(b"ping")
        elif kind == 0x30:  # "0{...}": open; connect to the main namespace
            self.transport.write(text_frame(b"40"))  # type: ignore[union-attr]
            w.count(b"(engine.io open)")
        else:
            w.count(b"(engine.io packet)")
        return 0

    def _frame(self, b0: int, data: bytes | bytearray, start: int, end: int, now: int) -> int:
        """Any frame but a whole text frame; returns the seq of an alert it completes."""
        op = b0 & 0x0F
        fin = b0 & 0x80
        if b0 & 0x40 and self.inflate is not None and fin and op in (OP_TEXT, OP_BINARY):
            return self._inflated(op, bytes(data[start:end]), now)
        if b0 & 0x70:
            self._protocol_error("reserved bits set")
            return 0
        if op == OP_TEXT or op == OP_BINARY:
            if fin:  # a whole binary frame (whole text frames never come here)
                self.w.count(b"(binary)")
                return 0
            self.frag = bytearray(data[start:end])
            self.frag_op = op
            return 0
        if op == OP_CONT:
            if self.frag is None:
                self._protocol_error("continuation without a first fragment")
                return 0
            self.frag += data[start:end]
            if not fin:
                return 0
            message = bytes(self.frag)
            self.frag = None
            if self.frag_op == OP_TEXT:
                return self._text(message, now)
            self.w.count(b"(binary)")
            return 0
        payload = bytes(data[start:end])
        if op == OP_PING:
            self.w.ws_pings += 1
            self.transport.write(client_frame(payload, OP_PONG))  # type: ignore[union-attr]
        elif op == OP_CLOSE:
            self.code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if not self.close_sent:
                self.close_sent = True
                echo = self.code if self.code != 1005 else 1000
                self.transport.write(close_frame(echo))  # type: ignore[union-attr]
            self.state = SHUT  # the server closes the TCP connection next
        elif op != OP_PONG:
            self._protocol_error(f"opcode {op}")
        return 0

    def _inflated(self, op: int, payload: bytes, now: int) -> int:
        """A compressed message (RFC 7692): inflated, then read as any other."""
        if self.inflate_bits < 0:  # server_no_context_takeover: every message stands alone
            self.inflate = zlib.decompressobj(self.inflate_bits)
        try:
            text = self.inflate.decompress(payload + b"\x00\x00\xff\xff")
        except zlib.error as exc:
            self._protocol_error(f"inflate: {exc}")
            return 0
        self.w.inflated += 1
        if op != OP_TEXT:
            self.w.count(b"(binary)")
            return 0
        return self._text(text, now)

    def _message(self, text: bytes, now: int) -> int:
        """A text message off the fast path; returns its seq if it is an alert."""
        w = self.w
        if text.startswith(PING_PREFIX):
            m = TS_RE.search(text)
            self.transport.write(  # type: ignore[union-attr]
                client_frame(b'{"type":"pong","ts":%s}' % (m[1] if m else b"null"))
            )
            w.pings += 1
            w.count(b"ping")
            return 0
        if text.startswith(ESTABLISHED_PREFIX):
            self._established(now)
            w.count(b"connection_established")
            return 0
        m = TYPE_RE.match(text)
        kind = m[1] if m else None
        if kind is None or kind == b"alert":
            try:
                frame = json.loads(text)
                kind = str(frame.get("type")).encode()
                if kind == b"alert":  # an alert frame not in tocsin's exact layout
                    seq = int(frame["seq"])
                    key = alert_key(frame["alert"]["alert_id"])
            except (ValueError, AttributeError, KeyError, TypeError):
                w.count(b"(unreadable)")
                return 0
            if kind == b"alert":
                w.ids.append(key)
                w.times.append(now)
                w.client_idx.append(self.idx)
                w.alerts += 1
                w.frames += 1
                return seq
            if kind in (b"ping", b"connection_established"):  # other spacing: rare
                if kind == b"ping":
                    ts = json.dumps(frame.get("ts")).encode()
                    self.transport.write(client_frame(b'{"type":"pong","ts":%s}' % ts))  # type: ignore[union-attr]
                    w.pings += 1
                else:
                    self._established(now)
        w.count(kind)
        return 0

    def _established(self, now: int) -> None:
        if self.state == OPEN:
            self.state = LIVE
            self.t_established = now
            self.w.open += 1
            self._done(None)

    def _protocol_error(self, what: str) -> None:
        self.w.count(f"(protocol error: {what})".encode())
        self.code = 1002
        if self.transport is not None:
            if not self.close_sent:
                self.close_sent = True
                self.transport.write(close_frame(1002))
            self.transport.close()
        self.state = SHUT
        self._done(f"protocol error: {what}")

    # -------------------------------------------------------- handshake

    def _handshake(self, data: bytes) -> None:
        buf = self.buf
        if buf is None:
            buf = self.buf = bytearray(data)
        else:
            buf += data
        if self.state == REFUSED:
            self._refused(final=False)
            return
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > 65536:
                self._fail("response headers over 64 KiB")
            return
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        rest = bytes(buf[end + 4 :])
        self.buf = None
        parts = lines[0].split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(f"not an HTTP response: {lines[0][:80]!r}")
            return
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 101:
            self.http_status = status
            self.state = REFUSED
            self.need = int(headers.get("content-length", -1))
            self.buf = bytearray(rest)
            self._refused(final=False)
            return
        if headers.get("sec-websocket-accept") != self.accept:
            self._fail("101 without the right Sec-WebSocket-Accept")
            return
        self.accept = ""
        extensions = headers.get("sec-websocket-extensions", "")
        if "permessage-deflate" in extensions:
            if not self.flags & DEFLATE:
                self._fail("permessage-deflate accepted but not offered")
                return
            bits = re.search(r"server_max_window_bits=(\d+)", extensions)
            wbits = -int(bits[1]) if bits else -15
            self.inflate = zlib.decompressobj(wbits)
            self.inflate_bits = wbits if "server_no_context_takeover" in extensions else 0
            self.w.deflate_accepted += 1
        self.state = OPEN
        if rest:
            self._frames(rest, len(rest))

    def _refused(self, final: bool) -> None:
        body = bytes(self.buf or b"")
        length = self.need
        if not final and len(body) < (200 if length < 0 else min(200, length)):
            if not body.endswith(b"0\r\n\r\n"):  # the end of a chunked body
                return
        self._fail(f"HTTP {self.http_status}: {body[:200].decode('utf-8', 'replace')}")

    def _fail(self, reason: str) -> None:
        self.state = SHUT if self.transport is not None else CLOSED
        self.buf = None
        self._done(reason)
        if self.transport is not None:
            self.transport.close()

    def _done(self, reason: str | None) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(reason)

    def start_close(self, code: int = 1000) -> None:
        """Send a close frame (or drop a connection still in its handshake)."""
        transport = self.transport
        if transport is None:
            return
        if self.state in (OPEN, LIVE) and not self.close_sent:
            self.close_sent = True
            self.state = CLOSING
            transport.write(close_frame(code))
        elif self.state < OPEN:
            transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# ---------------------------------------------------------------- one worker process


class Worker:
    """The state of one worker process: its clients and its receipt columns."""

    def __init__(
        self, host: str, port: int, loop_kind: str, fd_limit: int, ack_interval: float = 0.0
    ) -> None:
        self.host = host
        self.port = port
        self.host_header = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        self.loop_kind = loop_kind
        self.fd_limit = fd_limit
        self.clients: set[WsClient] = set()  # every client with a transport
        self.closing: set[WsClient] = set()  # the connections close_all waits for
        self.drained: asyncio.Future[None] | None = None  # resolved when closing is empty
        self.rbuf = bytearray(256 * 1024)  # every client's reads land here, then are parsed
        self.rview = memoryview(self.rbuf)
        self.ack_interval = ack_interval
        self.dirty: set[WsClient] = set()  # clients with an ack to send at the next flush
        self.ack_timer: asyncio.TimerHandle | None = None
        self.ids = array("q")
        self.times = array("q")
        self.client_idx = array("q")
        self.types: dict[bytes, int] = {}
        self.alerts = 0  # alert frames since the start (never cleared)
        self.frames = 0  # text messages since the start
        self.open = 0
        self.closed: dict[int, int] = {}
        self.pings = 0
        self.ws_pings = 0
        self.acks = 0
        self.deflate_accepted = 0  # handshakes whose server accepted permessage-deflate
        self.inflated = 0  # compressed messages received

    def ack_later(self, client: WsClient) -> None:
        self.dirty.add(client)
        if self.ack_timer is None:
            loop = asyncio.get_running_loop()
            self.ack_timer = loop.call_later(self.ack_interval, self.flush_acks)

    def flush_acks(self) -> None:
        """Send the pending cumulative ack of every client that has one (ack_interval > 0)."""
        self.ack_timer = None
        for client in self.dirty:
            if client.state == LIVE and client.transport is not None:
                client.transport.write(client.ack_frame(client.acked))
                self.acks += 1
        self.dirty.clear()

    def count(self, kind: bytes) -> None:
        self.types[kind] = self.types.get(kind, 0) + 1
        self.frames += 1

    # -------------------------------------------------------- commands

    async def connect(
        self, specs: list[tuple[int, str, bool, int]], concurrency: int, timeout: float
    ) -> tuple[int, dict[str, int], list[tuple[int, float, int]]]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending = iter(specs)
        ok = 0
        failures: dict[str, int] = {}
        established: list[tuple[int, float, int]] = []

        async def one_at_a_time() -> None:
            nonlocal ok
            for idx, path, ack, *flags in pending:
                client = WsClient(self, idx, path, ack, flags[0] if flags else 0)
                waiter = client.waiter = loop.create_future()

                def protocol(c: WsClient = client) -> WsClient:
                    return c

                reason: str | None
                try:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(remaining):
                        await loop.create_connection(protocol, self.host, self.port)
                        reason = await waiter
                except TimeoutError:
                    reason = f"no connection_established within {timeout:g} s"
                    client.waiter = None
                    client.abort()
                except OSError as exc:
                    reason = f"connect: {type(exc).__name__}: {exc.strerror or exc}"
                if reason is None:
                    ok += 1
                    ms = (client.t_established - client.t_start) / 1e6
                    established.append((idx, ms, client.t_start))
                else:
                    failures[reason] = failures.get(reason, 0) + 1

        await asyncio.gather(*(one_at_a_time() for _ in range(max(1, concurrency))))
        gc.freeze()  # the clients are long-lived: keep them out of the collector's scans
        return ok, failures, established

    def received(self) -> int:
        return self.alerts

    def collect(self) -> tuple[array[int], array[int], array[int], dict[str, int]]:
        out = self.ids, self.times, self.client_idx, self.decoded_types()
        self.ids, self.times, self.client_idx = array("q"), array("q"), array("q")
        self.types = {}
        return out

    def decoded_types(self) -> dict[str, int]:
        types = {k.decode("utf-8", "replace"): v for k, v in self.types.items()}
        alerts = len(self.ids)
        if alerts:
            types["alert"] = types.get("alert", 0) + alerts
        return types

    def status(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "closed": dict(self.closed),
            "pings_answered": self.pings,
            "ws_pings_answered": self.ws_pings,
            "acks_sent": self.acks,
            "deflate_accepted": self.deflate_accepted,
            "inflated": self.inflated,
            "alerts": self.alerts,
            "frames": self.frames,
        }

    def usage(self) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "pid": os.getpid(),
            "cpu_seconds": ru.ru_utime + ru.ru_stime,
            "rss_bytes": rss_bytes(),
            "loop": self.loop_kind,
            "fd_limit": self.fd_limit,
            "connections": len(self.clients),
        }

    async def close_all(self, timeout: float, only: list[int] | None = None) -> None:
        """Close every connection (or those of the client indices ``only``) with 1000;
        wait for the server to close TCP, then drop what is left."""
        chosen = set(only) if only is not None else None
        closing = self.closing = {c for c in self.clients if chosen is None or c.idx in chosen}
        loop = asyncio.get_running_loop()
        self.drained = loop.create_future()
        for client in list(closing):
            client.start_close(1000)
        if closing:
            with contextlib.suppress(TimeoutError):  # resolved by the last connection_lost
                await asyncio.wait_for(asyncio.shield(self.drained), timeout)
        for client in list(closing):  # the server did not close: drop the connection
            client.abort()
        if closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.drained), 5)
        self.drained = None
        self.closing = set()


def rss_bytes() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _worker_main(conn: Connection, host: str, port: int, ack_interval: float) -> None:
    """The body of one worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    fd_limit = raise_fd_limit()
    kind = "uvloop" if uvloop is not None else "asyncio"
    factory = uvloop.new_event_loop if uvloop is not None else None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(conn, Worker(host, port, kind, fd_limit, ack_interval)))


async def _serve(conn: Connection, w: Worker) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def reply(req: int, ok: bool, payload: Any) -> None:
        try:
            conn.send((req, ok, payload))
        except (OSError, ValueError):  # the parent is gone
            traceback.print_exc()
            if not stop.done():
                stop.set_result(None)

    async def run(req: int, coro: Any) -> None:
        try:
            result = await coro
        except Exception:
            reply(req, False, traceback.format_exc())
        else:
            reply(req, True, result)

    def on_command() -> None:
        while not stop.done() and conn.poll():
            try:
                req, cmd, args = conn.recv()
            except EOFError:  # the parent is gone
                stop.set_result(None)
                return
            except OSError:
                traceback.print_exc()
                stop.set_result(None)
                return
            if cmd == "stop":
                reply(req, True, None)
                stop.set_result(None)
                return
            if cmd in ("connect", "close_all"):
                task = loop.create_task(run(req, getattr(w, cmd)(*args)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            try:
                result = getattr(w, cmd)(*args)
            except Exception:
                reply(req, False, traceback.format_exc())
            else:
                reply(req, True, result)

    loop.add_reader(conn.fileno(), on_command)
    # uvloop (libuv) makes a polled descriptor non-blocking; the pipe must block, or a
    # message that has only partly arrived would fail with BlockingIOError.
    os.set_blocking(conn.fileno(), True)
    reply(0, True, w.usage())
    try:
        await stop
    finally:
        loop.remove_reader(conn.fileno())
        for client in list(w.clients):
            client.abort()
        for task in list(tasks):
            task.cancel()


# ---------------------------------------------------------------- parent side


@dataclass(frozen=True)
class ClientSpec:
    path_and_query: str  # e.g. "/api/v1/alerts/ws?auth_token=...&client_id=d17&ack_mode=client"
    ack: bool = True  # send a cumulative ack after each read that brought alerts
    engineio: bool = False  # speak Engine.IO v4 / Socket.IO (the peer of tocsin bench peers)
    deflate: bool = False  # offer permessage-deflate in the handshake, as browsers do

    @property
    def flags(self) -> int:
        return (ENGINEIO if self.engineio else 0) | (DEFLATE if self.deflate else 0)


@dataclass
class ConnectResult:
    ok: int
    failed: int
    seconds: float
    failures: dict[str, int]  # reason -> count
    established_ms: list[float]  # per connected client, in spec order: start -> established
    clients: list[int] = field(default_factory=list)  # their client indices (as in Receipts)
    started_ns: list[int] = field(default_factory=list)  # monotonic_ns at each one's start


@dataclass
class Receipts:
    """Alert frames received since the last collect, one row per frame (all workers)."""

    alert_ids: array[int]  # alert_key(alert_id): the int id itself for int ids
    recv_ns: array[int]  # time.monotonic_ns() when the read that brought the frame returned
    clients: array[int]  # the client's index: its spec's position across all connect() calls
    frames: dict[str, int] = field(default_factory=dict)  # text frames by type, "alert" too

    def __len__(self) -> int:
        return len(self.alert_ids)


@dataclass
class Status:
    open: int  # connections that got connection_established and are not closed
    closed: dict[int, int]  # connections closed after connection_established, by close code
    pings_answered: int  # JSON {"type":"ping"} frames answered with a pong
    ws_pings_answered: int  # WebSocket protocol pings answered
    acks_sent: int
    alerts: int  # alert frames received since the start
    frames: int  # text messages received since the start
    deflate_accepted: int = 0  # handshakes whose server accepted permessage-deflate
    inflated: int = 0  # compressed messages received


@dataclass(frozen=True)
class ProcUsage:
    pid: int
    cpu_seconds: float  # user + system, since the worker started
    rss_bytes: int
    loop: str  # "uvloop" or "asyncio"
    fd_limit: int
    connections: int


class WorkerGone(RuntimeError):
    """A worker process ended while the parent waited for it."""


class _Handle:
    """The parent's end of one worker: its process, its pipe and the replies awaited."""

    def __init__(
        self,
        index: int,
        proc: multiprocessing.process.BaseProcess,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        if proc.pid is None:
            raise ValueError(f"load generator worker {index} has not been started")
        self.index = index
        self.proc = proc
        self.pid: int = proc.pid
        self.conn = conn
        self.loop = loop
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.next_req = 1
        self.gone = False
        self.reader = threading.Thread(
            target=self._read, name=f"loadgen-reader-{index}", daemon=True
        )

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                msg = None
            try:
                self.loop.call_soon_threadsafe(self._deliver, msg)
            except RuntimeError:  # the loop is closed
                return
            if msg is None:
                return

    def _deliver(self, msg: tuple[int, bool, Any] | None) -> None:
        if msg is None:
            self.gone = True
            error = WorkerGone(f"load generator worker {self.index} (pid {self.pid}) ended")
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(error)
            self.pending.clear()
            return
        req, ok, payload = msg
        waiting = self.pending.pop(req, None)
        if waiting is None or waiting.done():
            return
        if ok:
            waiting.set_result(payload)
        else:
            waiting.set_exception(RuntimeError(f"worker {self.index}: {payload}"))

    def expect(self, req: int) -> asyncio.Future[Any]:
        fut = self.pending[req] = self.loop.create_future()
        return fut

    async def call(self, cmd: str, *args: Any, timeout: float = 60) -> Any:
        if self.gone:
            raise WorkerGone(f"load generator worker {self.index} has ended")
        req = self.next_req
        self.next_req += 1
        fut = self.expect(req)
        try:
            self.conn.send((req, cmd, args))
        except (OSError, ValueError) as exc:
            self.pending.pop(req, None)
            raise WorkerGone(f"load generator worker {self.index}: {exc}") from exc
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.pending.pop(req, None)


@contextlib.contextmanager
def _plain_main() -> Any:
    """Spawn children without re-running the parent's ``__main__`` (e.g. the ``tocsin``
    console script, which imports the whole CLI): they need this module only."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is not None:
            sys.modules["__main__"] = main


class LoadGen:
    """Many WebSocket clients in ``processes`` worker processes; see the module docstring."""

    def __init__(
        self, host: str, port: int, processes: int = 2, *, ack_interval: float = 0.0
    ) -> None:
        """``ack_interval`` 0: each client acks at the end of every read that brought
        alerts. Above 0: the acks of all clients of a worker are sent together, at most
        ``ack_interval`` seconds later (still one cumulative ack per client), as the
        protocol recommends for real clients (docs/protocol.md §7)."""
        self.host = host
        self.port = port
        self.processes = max(1, processes)
        self.ack_interval = ack_interval
        self._handles: list[_Handle] = []
        self._next_client = 0
        self._stopped = False

    async def __aenter__(self) -> LoadGen:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, timeout: float = 60) -> None:
        """Spawn the workers; return once each one runs its event loop."""
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        ready = []
        for i in range(self.processes):
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(
                target=_worker_main,
                args=(child_end, self.host, self.port, self.ack_interval),
                name=f"tocsin-loadgen-{i}",
                daemon=True,
            )
            with _plain_main():
                proc.start()
            child_end.close()
            handle = _Handle(i, proc, parent_end, loop)
            ready.append(handle.expect(0))
            handle.reader.start()
            self._handles.append(handle)
        try:
            await asyncio.wait_for(asyncio.gather(*ready), timeout)
        except BaseException:
            await self._end_processes(5)
            raise

    async def _all(self, cmd: str, *args: Any, timeout: float = 60) -> list[Any]:
        return await asyncio.gather(*(h.call(cmd, *args, timeout=timeout) for h in self._handles))

    async def connect(
        self, specs: list[ClientSpec], concurrency: int = 256, timeout: float = 120
    ) -> ConnectResult:
        """Connect ``specs`` (round-robin over the workers), at most ``concurrency`` at once
        in all; return when each is established, refused, failed or out of time."""
        t0 = time.perf_counter()
        first = self._next_client
        self._next_client += len(specs)
        n = len(self._handles)
        shares: list[list[tuple[int, str, bool, int]]] = [[] for _ in range(n)]
        for i, spec in enumerate(specs):
            shares[i % n].append((first + i, spec.path_and_query, spec.ack, spec.flags))
        per_worker = max(1, -(-concurrency // n))
        results = await asyncio.gather(
            *(
                h.call("connect", share, min(per_worker, len(share)), timeout, timeout=timeout + 60)
                for h, share in zip(self._handles, shares, strict=True)
                if share
            )
        )
        ok = 0
        failures: dict[str, int] = {}
        established: list[tuple[int, float, int]] = []
        for w_ok, w_failures, w_established in results:
            ok += w_ok
            for reason, count in w_failures.items():
                failures[reason] = failures.get(reason, 0) + count
            established.extend(w_established)
        established.sort()
        return ConnectResult(
            ok=ok,
            failed=len(specs) - ok,
            seconds=time.perf_counter() - t0,
            failures=failures,
            established_ms=[ms for _, ms, _ in established],
            clients=[idx for idx, _, _ in established],
            started_ns=[ns for _, _, ns in established],
        )

    async def received(self) -> int:
        """Alert frames received so far by all workers (since the start; not cleared)."""
        return sum(await self._all("received"))

    async def collect(self) -> Receipts:
        """Every receipt since the last collect (then cleared in the workers)."""
        out = Receipts(array("q"), array("q"), array("q"), {})
        for ids, times, clients, kinds in await self._all("collect", timeout=300):
            out.alert_ids.extend(ids)
            out.recv_ns.extend(times)
            out.clients.extend(clients)
            for kind, count in kinds.items():
                out.frames[kind] = out.frames.get(kind, 0) + count
        return out

    async def status(self) -> Status:
        total = Status(0, {}, 0, 0, 0, 0, 0)
        for s in await self._all("status"):
            total.open += s["open"]
            for code, count in s["closed"].items():
                total.closed[code] = total.closed.get(code, 0) + count
            total.pings_answered += s["pings_answered"]
            total.ws_pings_answered += s["ws_pings_answered"]
            total.acks_sent += s["acks_sent"]
            total.alerts += s["alerts"]
            total.frames += s["frames"]
            total.deflate_accepted += s["deflate_accepted"]
            total.inflated += s["inflated"]
        return total

    async def usage(self) -> list[ProcUsage]:
        return [ProcUsage(**u) for u in await self._all("usage")]

    async def close_all(self, timeout: float = 30, clients: list[int] | None = None) -> None:
        """Close every connection with 1000 and wait for the server to close TCP (then drop
        whatever is left after ``timeout``). ``clients``: only these client indices."""
        handles = [h for h in self._handles if not h.gone]
        only = list(clients) if clients is not None else None
        await asyncio.gather(
            *(h.call("close_all", timeout, only, timeout=timeout + 30) for h in handles)
        )

    async def stop(self, timeout: float = 30) -> None:
        """close_all, then end the workers (killed if they do not exit in time)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            if any(not h.gone for h in self._handles):
                with contextlib.suppress(WorkerGone, TimeoutError):
                    await self.close_all(timeout)
        finally:
            await self._end_processes(10)

    async def _end_processes(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        for h in self._handles:
            if not h.gone:
                with contextlib.suppress(WorkerGone, TimeoutError, RuntimeError):
                    await h.call("stop", timeout=5)
        for h in self._handles:
            await loop.run_in_executor(None, h.proc.join, timeout)
            if h.proc.is_alive():
                h.proc.kill()
                await loop.run_in_executor(None, h.proc.join, 5)
            await loop.run_in_executor(None, h.reader.join, 5)  # EOF once the worker is gone
            h.conn.close()

    @property
    def pids(self) -> list[int]:
        return [h.pid for h in self._handles]


__all__ = [
    "ClientSpec",
    "ConnectResult",
    "LoadGen",
    "ProcUsage",
    "Receipts",
    "Status",
    "Worker",
    "WorkerGone",
    "WsClient",
    "alert_key",
    "client_frame",
    "mask_payload",
    "text_frame",
]
