"""Overlapping connections of one device: one owner at a time, whatever the race (issue 9).

Each case opens connections of one device (``sub`` + ``client_id``) that overlap, on one
gateway and on two, and checks what a client sees: exactly one connection survives (the
others are closed with 4009), acks settle only what the acking connection received, no
connection gets an alert outside its own token, a client that stops reading can neither
hang its device nor rewind it, and a quick reconnect never waits for the old connection's
socket. ``make test`` runs each case a few times; ``make chaos`` (``TOCSIN_CHAOS=long``)
50 times.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from nats.js import JetStreamContext

from tocsin.core.embedded import free_port
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.gateway.journal import Journal
from tocsin.gateway.records import DeviceRecords

from ..support import (
    Client,
    GatewayProcess,
    RunningGateway,
    alert,
    append,
    eventually,
    start_gateway,
    token,
)

LONG = os.environ.get("TOCSIN_CHAOS", "").lower() == "long"
TRIALS = 50 if LONG else 3
pytestmark = [pytest.mark.chaos, pytest.mark.timeout(1800 if LONG else 240)]


@dataclass
class Conn:
    """One connection of a device: records every alert it gets and, if ``acks``, acks it."""

    client: Client
    acks: bool
    alerts: list[dict[str, Any]] = field(default_factory=list)
    acked: int = 0
    hello: dict[str, Any] = field(default_factory=dict)  # its connection_established
    task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, tok: str, acks: bool = True, client_id: str = "phone") -> Conn:
        conn = cls(await Client.connect(url, tok, client_id=client_id), acks)
        conn.task = asyncio.create_task(conn._run())
        return conn

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            while True:
                frame = await self.client.frames.get()
                if frame["type"] == "connection_established":
                    self.hello = frame
                if frame["type"] == "alert":
                    self.alerts.append(frame)
                    if self.acks:
                        await self.client.send({"type": "ack", "seq": frame["seq"]})
                        self.acked = frame["seq"]

    @property
    def open_(self) -> bool:
        return not self.client.closed.is_set()

    @property
    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.alerts]

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        with contextlib.suppress(Exception):
            await self.client.close()


async def settle(conns: list[Conn], what: str = "one connection left") -> Conn:
    """Wait until every connection is either established or closed and exactly one is open;
    the others must have been closed with 4009. Return the survivor."""

    def settled() -> bool:
        done = all(c.client.established or not c.open_ for c in conns)
        return done and sum(c.open_ for c in conns) == 1

    await eventually(settled, timeout=30, what=what)
    survivor = next(c for c in conns if c.open_)
    assert survivor.client.established
    codes = [c.client.close_code for c in conns if c is not survivor]
    assert codes == [4009] * len(codes), codes
    return survivor


def backlog_read(survivor: Conn, conns: list[Conn], expected: list[int]) -> bool:
    """Every alert of ``expected`` reached the survivor, or a connection that received it
    acked it (settled: by the contract it never comes again). Not the survivor alone: when
    handshakes are spread out (a loaded machine), a later connection takes the device over
    from one that already read, and acked, part of the backlog."""
    settled = {s for c in conns for s in c.seqs if s <= c.acked}
    return set(expected) <= set(survivor.seqs) | settled


@pytest.fixture(params=["one", "two"])
async def gws(
    request: pytest.FixtureRequest, make_settings: Callable[..., Settings], js: JetStreamContext
) -> AsyncIterator[list[RunningGateway]]:
    """One gateway, or two instances sharing NATS (connections alternate between them)."""
    # Long waits: a takeover that waited for anything (the old socket, a timeout) would show
    # as a missed deadline in the cases below.
    settings = make_settings(
        takeover_seconds=60,
        shutdown_grace_seconds=60,
        max_inflight=STALL_WINDOW,
        offline_queue_max=STALL_WINDOW,
    )
    running = [await start_gateway(settings) for _ in range(1 if request.param == "one" else 2)]
    yield running
    for gateway in running:
        await gateway.stop()


def url(gws: list[RunningGateway], i: int) -> str:
    return gws[i % len(gws)].ws_url


def device() -> str:
    return "d" + uuid.uuid4().hex[:10]


def tok_user(tok: str) -> str:
    import jwt

    return str(jwt.decode(tok, options={"verify_signature": False})["sub"])


async def _simultaneous(
    gws: list[RunningGateway], js: JetStreamContext, names: Names, known: bool
) -> None:
    tok = token(device())
    if known:
        await Client.introduce(url(gws, 0), tok)
        consumer = gws[0].gw.names.device_consumer(tok_user(tok), "phone")
        await eventually(lambda: sessions_of(gws, consumer) == 0, what="the first one gone")
    before = sum(g.gw.owners.counts["superseded"] + g.gw.owners.counts["taken_over"] for g in gws)
    conns = list(await asyncio.gather(*(Conn.open(url(gws, i), tok) for i in range(3))))
    survivor = await settle(conns)
    after = sum(g.gw.owners.counts["superseded"] + g.gw.owners.counts["taken_over"] for g in gws)
    assert after - before == 2  # each loser counted once (tocsin_gateway_device_claims_total)
    sent = await append(js, names, alert())
    await eventually(lambda: sent.seq in survivor.seqs, what="the alert at the survivor")
    assert all(c.seqs == [] for c in conns if c is not survivor)
    for c in conns:
        await c.close()


# ---------------------------------------------------------------- 1. both stay open
@pytest.mark.parametrize("known", [False, True], ids=["new", "known"])
async def test_simultaneous_connects_leave_exactly_one(
    gws: list[RunningGateway], js: JetStreamContext, names: Names, known: bool
) -> None:
    for _ in range(TRIALS):
        await _simultaneous(gws, js, names, known)


async def _overlapping_readers(
    gws: list[RunningGateway], js: JetStreamContext, names: Names
) -> None:
    tok = token(device())
    older = await Conn.open(url(gws, 0), tok, acks=False)
    await eventually(lambda: older.client.established, what="the older connection")
    expected = [(await append(js, names, alert())).seq for _ in range(40)]
    await eventually(lambda: len(older.alerts) == 40, what="40 alerts at the older one")
    a, b = await asyncio.gather(
        Conn.open(url(gws, 1), tok, acks=False), Conn.open(url(gws, 2), tok, acks=True)
    )
    survivor = await settle([older, a, b])
    await eventually(
        lambda: backlog_read(survivor, [older, a, b], expected) or survivor.acked == expected[-1],
        what="the survivor to read the whole backlog (or another connection to settle it)",
    )
    for c in (older, a, b):
        got = set(c.seqs)
        unreceived = [s for s in expected if s <= c.acked and s not in got]
        assert not unreceived, f"acked {c.acked} without receiving {unreceived}"
        await c.close()
    highest = max(c.acked for c in (older, a, b))
    last = await Conn.open(url(gws, 0), tok)
    rest = [s for s in expected if s > highest]
    await eventually(lambda: set(rest) <= set(last.seqs), what="the unacked alerts again")
    assert last.seqs == rest  # in order, nothing acked comes again
    await last.close()


# ---------------------------------------------------------------- 2. alerts lost
async def test_overlapping_readers_never_settle_what_they_did_not_receive(
    gws: list[RunningGateway], js: JetStreamContext, names: Names
) -> None:
    """An older connection holds 40 unacked alerts; a never-acking and an acking connection
    open at once. Whatever happens, an ack covers only what its own connection received,
    and the next connection gets everything after the highest ack."""
    for _ in range(TRIALS):
        await _overlapping_readers(gws, js, names)


async def _token_change(gws: list[RunningGateway], js: JetStreamContext, names: Names) -> None:
    user = device()
    wide, narrow = token(user, ("KE", "UG")), token(user, ("KE",))
    older = await Conn.open(url(gws, 0), wide, acks=False)
    await eventually(lambda: older.client.established, what="the older connection")
    for _ in range(8):
        await append(js, names, alert("KE-30"))
        await append(js, names, alert("UG-102"))
    await eventually(lambda: len(older.alerts) == 16, what="16 alerts at the older one")
    a, b = await asyncio.gather(
        Conn.open(url(gws, 1), wide, acks=False), Conn.open(url(gws, 2), narrow, acks=False)
    )
    survivor = await settle([older, a, b])
    want = 16 if survivor is not b else 8
    await eventually(lambda: len(survivor.alerts) >= want, what="the survivor's backlog")
    # and one after the other: the narrow token reads what the wide one left unacked
    for c in (older, a, b):
        await c.close()
    after = await Conn.open(url(gws, 1), narrow, acks=False)
    await eventually(lambda: len(after.alerts) >= 8, what="the KE backlog again")
    await after.client.nothing_more(0.3)
    for c in (b, after):
        regions = {f["alert"]["location"]["region"] for f in c.alerts}
        assert regions <= {"KE-30"}, f"a KE token received {regions}"
    await after.close()


# ---------------------------------------------------------------- 3. outside the token
async def test_no_connection_gets_an_alert_outside_its_own_token(
    gws: list[RunningGateway], js: JetStreamContext, names: Names
) -> None:
    """Tokens change between connections (a refresh that narrows the regions): the device's
    queue may hold UG alerts from its wider token, but a KE token never receives them."""
    for _ in range(TRIALS):
        await _token_change(gws, js, names)


# ---------------------------------------------------------------- 4. a stalled socket
@dataclass
class Stalled:
    """A WebSocket client that reads ``connection_established`` and then never reads again,
    with a small receive buffer: what the gateway sends backs up into its own buffers."""

    sock: socket.socket

    @classmethod
    async def open(cls, port: int, tok: str, client_id: str = "phone") -> Stalled:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /api/v1/alerts/ws?auth_token={tok}&client_id={client_id} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        data = b""
        async with asyncio.timeout(10):
            while b"connection_established" not in data:
                chunk = await loop.sock_recv(sock, 4096)
                assert chunk, f"closed during the handshake: {data!r}"
                data += chunk
        assert data.startswith(b"HTTP/1.1 101"), data[:80]
        return cls(sock)

    def abandon(self) -> None:
        self.sock.close()


def big_alert() -> dict[str, Any]:
    return alert(message="🦟" * 8000)  # about 32 KB of JSON


#: Big alerts for a stalled reader: 5 MB, more than loopback socket buffers hold (they grow
#: to ~4 MB), all inside the window (nothing is resent on an open connection, so only a
#: window's worth is ever written to a socket that stopped reading) and the offline queue
#: cap (the next connection gets them all, none truncated).
STALL_BURST = 160
STALL_WINDOW = 256


def sessions_of(gws: list[RunningGateway], consumer: str) -> int:
    return sum(h.consumer == consumer for g in gws for h in g.gw.owners.holders.values())


async def test_a_client_that_stops_reading_is_closed_and_frees_its_device(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> None:
    """Heartbeats 2 s: the session of a client that never reads ends by itself (closing
    cannot wait on a drain that never ends), and the device can be used again at once."""
    gateway = await start_gateway(
        make_settings(heartbeat_seconds=2.0, takeover_seconds=60, max_inflight=STALL_WINDOW)
    )
    try:
        for _ in range(TRIALS):
            user = device()
            consumer = names.device_consumer(user, "phone")
            stalled = await Stalled.open(gateway.port, token(user))
            for _ in range(STALL_BURST):
                await append(js, names, big_alert())
            await eventually(
                lambda c=consumer: sessions_of([gateway], c) == 0,
                timeout=30,
                what="the stalled session to end",
            )
            again = await Conn.open(gateway.ws_url, token(user))
            await eventually(lambda a=again: a.client.established, what="a new connection")
            stalled.abandon()
            await again.close()
    finally:
        await gateway.stop()


async def _stalled_owner(
    gws: list[RunningGateway], js: JetStreamContext, names: Names, trial: int
) -> None:
    user = device()
    consumer = names.device_consumer(user, "phone")
    stalled = await Stalled.open(gws[0].port, token(user))
    for _ in range(STALL_BURST):
        await append(js, names, big_alert())

    def stuck() -> bool:
        return any(s.writing for s in gws[0].gw.sessions if s.consumer == consumer)

    await eventually(stuck, what="the stalled session to wait on its socket")
    new = await Conn.open(url(gws, trial + 1), token(user))
    await eventually(lambda: new.client.established, what="the takeover, not waiting")
    for _ in range(10):
        await append(js, names, alert())
    total = STALL_BURST + 10
    await eventually(lambda: len(set(new.seqs)) == total, what=f"{total} alerts at the new one")
    await eventually(lambda: new.acked == new.seqs[-1], what="all acked")
    await new.close()
    stalled.abandon()
    await eventually(lambda: sessions_of(gws, consumer) == 0, what="both sessions gone")
    last = await Conn.open(url(gws, trial), token(user))
    await eventually(lambda: last.client.established, what="the next connection")
    await last.client.nothing_more(1.0)
    assert last.alerts == []
    await last.close()


# ---------------------------------------------------------------- 5. acked alerts rewound
async def test_a_stalled_owner_lets_go_at_once_and_rewinds_nothing(
    gws: list[RunningGateway], js: JetStreamContext, names: Names
) -> None:
    """A stalled connection holds the device while its socket is stuck; a new connection
    takes over without waiting for that socket, receives and acks everything, and closes.
    When the stalled socket finally goes away nothing is rewound: the next connection gets
    nothing again."""
    for trial in range(TRIALS):
        await _stalled_owner(gws, js, names, trial)


# ---------------------------------------------------------------- 6. a quick reconnect
@pytest.mark.parametrize("goodbye", ["close", "abort"])
async def test_a_quick_reconnect_never_waits_for_the_old_connection(
    gws: list[RunningGateway], js: JetStreamContext, names: Names, goodbye: str
) -> None:
    """Connect again right after closing (or dropping the TCP connection without a close
    frame, so the old session is still there): established within the test's deadline,
    although a takeover may wait 60 s here."""
    tok = token(device())
    for i in range(TRIALS * 5):
        conn = await Conn.open(url(gws, i), tok)
        await eventually(lambda c=conn: c.client.established, what=f"connection {i}")
        if goodbye == "close":
            await conn.close()
        else:
            assert conn.client.ws._conn is not None
            transport = conn.client.ws._conn.transport
            assert transport is not None
            transport.abort()
            await conn.close()
    sent = await append(js, names, alert())
    final = await Conn.open(url(gws, 0), tok)
    await eventually(lambda: sent.seq in final.seqs, what="the alert after the reconnects")
    await final.close()


# ---------------------------------------------------------------- owners that do not answer
async def test_a_frozen_owner_is_waited_for_never_overridden(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    """The gateway holding the device is frozen (SIGSTOP) but still on NATS: a newcomer is
    refused with 4503 after TOCSIN_TAKEOVER_SECONDS instead of reading the queue beside it.
    Once the frozen gateway is gone from NATS (killed) the device is claimed at once."""
    frozen = gateway_process(make_settings())
    tok = token(device())
    old = await Conn.open(frozen.ws_url, tok)
    await eventually(lambda: old.client.established, what="the old connection")
    first = await append(js, names, alert())
    await eventually(lambda: old.acked == first.seq, what="the first alert acked")
    consumer = names.device_consumer(tok_user(tok), "phone")

    async def saved() -> bool:  # in the frozen gateway's positions journal, or in the queue
        info = await js.consumer_info(names.alerts_stream, consumer)
        if info.ack_floor is not None and info.ack_floor.stream_seq == first.seq:
            return True
        gateway = ((await DeviceRecords(js, names).recorded(consumer)) or {}).get("gateway")
        at = await Journal(js, names, "reader").read(str(gateway), consumer) if gateway else None
        return at is not None and at.floor == first.seq

    await eventually(saved, what="the ack checkpointed")  # a crash repeats nothing then
    assert frozen.proc is not None
    frozen.proc.send_signal(signal.SIGSTOP)
    running = await start_gateway(make_settings(takeover_seconds=2))
    try:
        refused = await Conn.open(running.ws_url, tok)
        assert await refused.client.wait_closed(timeout=20) == 4503
        assert not refused.client.established
        frozen.kill()
        second = await append(js, names, alert())
        new = await Conn.open(running.ws_url, tok)
        await eventually(lambda: second.seq in new.seqs, what="the device claimed")
        assert first.seq not in new.seqs  # acked before the freeze: not repeated
        for c in (old, refused, new):
            await c.close()
    finally:
        await running.stop()


class CuttableProxy:
    """A TCP proxy for one gateway's NATS connection that can be cut (both sides closed,
    new connections refused) and restored, on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.up = True
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        self.up = False
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self.up = True

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_a_gateway_that_lost_nats_cannot_act_for_a_device_claimed_meanwhile(
    make_settings: Callable[..., Settings], nats_url: str, js: JetStreamContext, names: Names
) -> None:
    """Gateway A loses NATS while it owns a device; the device connects to gateway B, which
    finds no responder for A and claims it. When A is back, its session finds the record
    taken and closes with 4009; it moved the device's queue not at all: B's position holds."""
    host, port = nats_url.removeprefix("nats://").split(":")
    proxy = CuttableProxy((host, int(port)))
    await proxy.start()
    a = await start_gateway(make_settings(nats_url=[proxy.url]))
    b = await start_gateway(make_settings())
    try:
        tok = token(device())
        old = await Conn.open(a.ws_url, tok)
        await eventually(lambda: old.client.established, what="the connection on A")
        proxy.cut()
        await eventually(lambda: not a.gw.nc.is_connected, what="A off NATS")
        new = await Conn.open(b.ws_url, tok)
        await eventually(lambda: new.client.established, what="the claim on B")
        seqs = [(await append(js, names, alert())).seq for _ in range(3)]
        await eventually(lambda: new.acked == seqs[-1], what="B's acks")
        proxy.restore()
        assert await old.client.wait_closed(timeout=30) == 4009
        assert old.seqs == []  # A sent nothing while it was off NATS, nor after
        await new.close()
        again = await Conn.open(b.ws_url, tok)
        await eventually(lambda: again.client.established, what="the device once more")
        await again.client.nothing_more(0.5)  # B's acks hold: A rewound nothing
        await old.close()
        await again.close()
    finally:
        await a.stop()
        await b.stop()
        await proxy.stop()


async def _process_race(
    procs: list[GatewayProcess], js: JetStreamContext, names: Names, trial: int
) -> None:
    tok = token(device())
    await Client.introduce(procs[0].ws_url, tok)
    expected = [(await append(js, names, alert())).seq for _ in range(20)]
    conns = list(
        await asyncio.gather(
            *(Conn.open(procs[i % 2].ws_url, tok, acks=i % 2 == trial % 2) for i in range(4))
        )
    )
    survivor = await settle(conns)
    await eventually(
        lambda: backlog_read(survivor, conns, expected),
        what="the backlog at the survivor (or settled by a connection that received it)",
    )
    for c in conns:
        got = set(c.seqs)
        assert not [s for s in expected if s <= c.acked and s not in got]
        await c.close()


async def test_two_gateway_processes_race_for_one_device(
    make_settings: Callable[..., Settings],
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
) -> None:
    """The race of case 1 and 2 across two real gateway processes."""
    settings = make_settings(takeover_seconds=60)
    procs = [gateway_process(settings), gateway_process(settings)]
    for trial in range(TRIALS):
        await _process_race(procs, js, names, trial)


def test_strict_frames_are_json_integers() -> None:
    """The ack frame's seq: a JSON integer only (CONTRACT §6)."""
    from pydantic import ValidationError

    from tocsin.schemas import client_frame_adapter

    for bad in ('"5"', "true", "5.0", "1e3"):
        with pytest.raises(ValidationError):
            client_frame_adapter.validate_python(orjson.loads(f'{{"type":"ack","seq":{bad}}}'))
    assert client_frame_adapter.validate_python({"type": "ack", "seq": 5}).seq == 5  # type: ignore[union-attr]


async def test_during_an_upgrade_a_session_of_the_previous_version_is_asked_to_leave(
    gateway: RunningGateway, js: JetStreamContext, nc: Any, names: Names
) -> None:
    """A record without ``owner`` was written by the version before ownership, whose
    sessions listen on ``tocsin.device.<consumer>.takeover`` and answer once they saved:
    a new gateway asks there first, once, so the two versions can serve side by side."""
    user = device()
    consumer = names.device_consumer(user, "phone")
    await Client.introduce(gateway.ws_url, token(user))

    async def released() -> bool:
        record = await gateway.gw.records.recorded(consumer)
        return record is not None and record["owner"] is None

    await eventually(released, what="the introduction's release")
    current = await gateway.gw.records.recorded(consumer)
    assert current is not None
    old_format = {k: v for k, v in current.items() if k not in ("owner", "gateway")}
    await js.publish(names.device_record_subject(consumer), orjson.dumps(old_format))
    asked: list[str] = []

    async def old_session(msg: Any) -> None:
        asked.append(msg.data.decode())
        await nc.publish(msg.reply, b"released")

    sub = await nc.subscribe(names.legacy_takeover_subject(consumer), cb=old_session)
    await nc.flush()
    try:
        new = await Conn.open(gateway.ws_url, token(user))
        await eventually(lambda: new.client.established, what="the new connection")
        assert asked == [new.hello["connection_id"]]  # asked once, by the new session
        await new.close()
        again = await Conn.open(gateway.ws_url, token(user))  # the record is current now
        await eventually(lambda: again.client.established, what="the next connection")
        assert len(asked) == 1
        await again.close()
    finally:
        await sub.unsubscribe()
