"""The bad-network link (tocsin.bench.netem) against real sockets on loopback.

Timing checks are lower bounds only (a byte never arrives before its latency; a transfer
never beats its bandwidth), which a loaded machine cannot break.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from tocsin.bench.netem import CHUNK, Link, Profile, profile

from ..support import eventually


@dataclass
class Peer:
    """The upstream's end of one connection: what it read (with times), how it ended."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    data: bytearray = field(default_factory=bytearray)
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # (time, total so far)
    eof: bool = False
    reset: bool = False
    reading: asyncio.Event = field(default_factory=asyncio.Event)

    async def pump(self) -> None:
        await self.reading.wait()
        try:
            while chunk := await self.reader.read(65536):
                self.data += chunk
                self.arrivals.append((time.monotonic(), len(self.data)))
                await self.reading.wait()
            self.eof = True
        except ConnectionError:
            self.reset = True


@dataclass
class Upstream:
    """A TCP server that records each connection (read at once unless ``reading`` is off)."""

    reading: bool = True
    peers: list[Peer] = field(default_factory=list)
    server: asyncio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = Peer(reader, writer)
        if self.reading:
            peer.reading.set()
        self.peers.append(peer)
        await peer.pump()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def linked(p: Profile | None, reading: bool = True) -> AsyncIterator[tuple[Link, Upstream]]:
    up = Upstream(reading)
    up.server = await asyncio.start_server(up._accept, "127.0.0.1", 0)
    link = await Link([("127.0.0.1", up.port)], p).start()
    try:
        yield link, up
    finally:
        await link.stop()
        up.server.close()
        for peer in up.peers:
            peer.writer.close()


async def dial(link: Link) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(link.host, link.port)


async def read_all(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """Everything until the end; True if it ended with a reset."""
    out = bytearray()
    try:
        while chunk := await reader.read(65536):
            out += chunk
    except ConnectionError:
        return bytes(out), True
    return bytes(out), False


async def test_latency_holds_each_byte_at_least_its_one_way_time() -> None:
    async with linked(Profile("slow", latency=0.2)) as (link, up):
        reader, writer = await dial(link)
        sent = time.monotonic()
        writer.write(b"ping")
        await eventually(lambda: bytes(up.peers[0].data) == b"ping" if up.peers else False)
        assert up.peers[0].arrivals[0][0] - sent >= 0.2
        back = time.monotonic()
        up.peers[0].writer.write(b"pong")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"pong"
        assert time.monotonic() - back >= 0.2
        assert (link.bytes_up, link.bytes_down) == (4, 4)
        writer.close()


async def test_bandwidth_bounds_throughput() -> None:
    rate, size = 50_000, 100_000
    async with linked(Profile("thin", bandwidth=rate)) as (link, up):
        _reader, writer = await dial(link)
        started = time.monotonic()
        writer.write(bytes(size))
        await eventually(lambda: bool(up.peers) and len(up.peers[0].data) == size, 30)
        took = up.peers[0].arrivals[-1][0] - started
        burst = max(1500, rate // 50)
        assert took >= (size - burst) / rate  # it never beats its bandwidth
        writer.close()


async def test_a_blackhole_holds_bytes_and_the_fin_then_releases_them_in_order() -> None:
    async with linked(Profile("hole", latency=0.01)) as (link, up):
        reader, writer = await dial(link)
        client = Peer(reader, writer)
        client.reading.set()
        pump = asyncio.create_task(client.pump())
        writer.write(b"0")
        await eventually(lambda: bool(up.peers) and bytes(up.peers[0].data) == b"0")
        peer = up.peers[0]
        outage = link.hold()
        writer.write(b"ab")
        writer.write(b"cd")
        writer.write_eof()  # the client closes during the hold
        peer.writer.write(b"xyz")
        peer.writer.write_eof()  # and so does the server
        record = link.conns[0]
        await eventually(lambda: record.client_closed is not None, what="the link read the FIN")
        await eventually(lambda: record.server_closed is not None, what="the server's FIN")
        assert link.held_bytes() == 7
        assert bytes(peer.data) == b"0" and not peer.eof and not peer.reset  # nothing passed
        assert not client.data and not client.eof and not client.reset
        # a new connection during the hold is accepted but reaches nobody
        _r2, w2 = await dial(link)
        w2.write(b"new")
        await eventually(lambda: link.connections == 2, what="the second accepted")
        assert len(up.peers) == 1
        link.release()
        await asyncio.wait_for(pump, 10)
        assert (bytes(client.data), client.eof) == (b"xyz", True)  # its bytes, then its FIN
        await eventually(lambda: peer.eof, what="the client's FIN upstream")
        assert bytes(peer.data) == b"0abcd"
        assert outage.end is not None and outage.end > outage.start
        assert client.arrivals[0][0] >= outage.end and peer.arrivals[-1][0] >= outage.end
        await eventually(lambda: len(up.peers) == 2 and bytes(up.peers[1].data) == b"new")
        w2.close()


async def test_a_client_that_gave_up_during_a_hold_never_reaches_the_upstream() -> None:
    async with linked(Profile("hole", latency=0.01)) as (link, up):
        link.hold()
        _reader, writer = await dial(link)
        writer.write(b"GET /")
        writer.close()
        await eventually(lambda: bool(link.conns) and link.conns[0].client_closed is not None)
        link.release()
        _r2, w2 = await dial(link)  # the next one does
        w2.write(b"x")
        await eventually(lambda: bool(up.peers) and bytes(up.peers[0].data) == b"x")
        assert len(up.peers) == 1
        w2.close()


async def test_a_cut_resets_both_sides_and_the_next_connection_works() -> None:
    async with linked(Profile("flap", latency=0.01)) as (link, up):
        reader, writer = await dial(link)
        writer.write(b"hi")
        await eventually(lambda: bool(up.peers) and bytes(up.peers[0].data) == b"hi")
        assert link.cut() == 1
        data, reset = await asyncio.wait_for(read_all(reader), 10)
        assert reset and data == b""
        await eventually(lambda: up.peers[0].reset, what="the upstream reset")
        assert link.cuts == 1 and link.conns[0].cut is not None
        _r2, w2 = await dial(link)
        w2.write(b"again")
        await eventually(lambda: len(up.peers) == 2 and bytes(up.peers[1].data) == b"again")
        w2.close()


async def test_buffers_stay_bounded_when_the_upstream_stops_reading() -> None:
    cap = 64 * 1024
    async with linked(Profile("full", latency=0.01, buffer=cap), reading=False) as (link, up):
        _reader, writer = await dial(link)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < 64 * 1024 * 1024:  # a bound: the writes must block long before
            writer.write(block)
            sent += len(block)
            try:
                await asyncio.wait_for(writer.drain(), 1.0)
            except TimeoutError:
                break  # the link stopped reading: backpressure
        assert sent < 64 * 1024 * 1024
        assert link.held_bytes() <= cap + CHUNK
        up.peers[0].reading.set()  # the upstream reads again: everything comes, in order
        await eventually(lambda: len(up.peers[0].data) == sent, 60, "the whole stream")
        assert bytes(up.peers[0].data) == block * (sent // len(block))
        writer.close()


async def test_outages_follow_the_profile_until_stopped() -> None:
    p = Profile("hole", outage="blackhole", every=(0.05, 0.1), lasting=(0.05, 0.1))
    async with linked(p) as (link, _):
        stop = asyncio.Event()
        task = asyncio.create_task(link.run_outages(stop))
        await eventually(lambda: len(link.outages) >= 2, what="two outages")
        stop.set()
        await asyncio.wait_for(task, 5)
        assert not link.held
        assert all(o.kind == "blackhole" and o.end is not None for o in link.outages)


def test_profiles_scale_and_bad_fields_are_named() -> None:
    short = profile("dead_zone", 0.1)
    assert short.lasting == (3.0, 12.0) and short.latency == profile("dead_zone").latency
    assert profile("2g", lasting=(1.0, 2.0)).lasting == (1.0, 2.0)
    with pytest.raises(ValueError, match="latency"):
        Profile("x", latency=-1)
    with pytest.raises(ValueError, match="bandwidth"):
        Profile("x", bandwidth=0)
    with pytest.raises(ValueError, match="outage"):
        Profile("x", outage="storm", every=(1, 2))
    with pytest.raises(ValueError, match="lasting"):
        Profile("x", outage="blackhole", every=(1, 2))
    with pytest.raises(ValueError, match="every"):
        Profile("x", every=(2, 1))
    with pytest.raises(ValueError, match="unknown name"):
        profile("3g")
    with pytest.raises(ValueError, match="upstreams"):
        Link([])
