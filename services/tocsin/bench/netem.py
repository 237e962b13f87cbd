"""A bad network in user space: a TCP proxy ("link") that shapes what passes through it.

A :class:`Link` listens on a loopback port and forwards each connection to an upstream
(one ``host:port``, or several taken in turn, skipping those that refuse). With a
:class:`Profile` it behaves like a bad mobile link, per direction:

* **latency**: every byte is held at least ``latency`` seconds (one way) before it is
  written on;
* **bandwidth**: a token bucket of ``bandwidth`` bytes/s bounds what is written;
* **outages**, every ``every`` seconds (a random up time), one of:

  - ``stall`` / ``blackhole`` (a "hold"): for ``lasting`` seconds nothing is forwarded in
    either direction, neither bytes nor a FIN nor a reset; bytes keep being read and
    queued (up to ``buffer`` per direction, then that side is not read any more: a full
    TCP window) and go on in order when the hold ends, an end of stream after them. A
    connection opened during a hold is accepted but reaches the upstream only when it ends
    (and not at all if its client gave up meanwhile: its SYN would never have arrived);
  - ``cut``: every connection through the link is reset at once, both sides (RST); new
    connections work at once.

Nothing is lost but what a cut drops. Counters: bytes each way, connections, cuts, every
outage with its start and end, and for each connection when each side ended it (as the
link read it), so the time a side takes to notice a dead link can be computed.

Without a profile (or with a profile that shapes nothing) bytes are piped straight through:
that is the plain round-robin proxy of the chaos suite. Times are ``time.monotonic()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from tocsin.core.embedded import free_port


def small_window(rcvbuf: int) -> Callable[[Any], socket.socket]:
    """An aiohttp ``TCPConnector(socket_factory=...)`` whose sockets get SO_RCVBUF =
    ``rcvbuf`` before they connect, so the window they advertise is small too (set
    afterwards, the kernel keeps honouring the window it already advertised): a client
    that stops reading backs up into its server at once."""

    def factory(addr: Any) -> socket.socket:
        family, kind, proto = addr[0], addr[1], addr[2]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return sock

    return factory


OUTAGES = ("stall", "blackhole", "cut")
#: The most read from a socket at once.
CHUNK = 65536
WS_PATH = "/api/v1/alerts/ws"


@dataclass(frozen=True)
class Profile:
    """How a link misbehaves. Durations in seconds, ``bandwidth`` in bytes/s each way."""

    name: str
    latency: float = 0.0  # one way, each direction
    bandwidth: float | None = None  # None: unlimited
    outage: str | None = None  # stall | blackhole | cut
    every: tuple[float, float] = (0.0, 0.0)  # up time before each outage, a random pick
    lasting: tuple[float, float] = (0.0, 0.0)  # how long a stall or blackhole lasts
    buffer: int = 256 * 1024  # bytes held per direction before that side is not read

    def __post_init__(self) -> None:
        if self.latency < 0:
            raise ValueError(f"Profile {self.name}: latency must be >= 0, not {self.latency}")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise ValueError(f"Profile {self.name}: bandwidth must be > 0, not {self.bandwidth}")
        if self.outage is not None and self.outage not in OUTAGES:
            raise ValueError(f"Profile {self.name}: outage must be one of {OUTAGES}")
        for name in ("every", "lasting"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"Profile {self.name}: {name} must be 0 <= low <= high")
        if self.outage is not None and self.every[0] <= 0:
            raise ValueError(f"Profile {self.name}: every must be > 0 with an outage")
        if self.outage in ("stall", "blackhole") and self.lasting[0] <= 0:
            raise ValueError(f"Profile {self.name}: lasting must be > 0 for a {self.outage}")
        if self.buffer < 1:
            raise ValueError(f"Profile {self.name}: buffer must be >= 1, not {self.buffer}")

    @property
    def shapes(self) -> bool:
        return bool(self.latency or self.bandwidth or self.outage)

    def scaled(self, factor: float) -> Profile:
        """The same link with its outages' durations (``every``, ``lasting``) times
        ``factor``; latency and bandwidth stay."""
        if factor <= 0:
            raise ValueError(f"Profile {self.name}: scale must be > 0, not {factor}")
        lo, hi = self.every
        a, b = self.lasting
        return replace(self, every=(lo * factor, hi * factor), lasting=(a * factor, b * factor))


#: The issue's figures (a rural 2G link, a dead zone, a link that keeps dropping).
PROFILES = {
    "2g": Profile(
        "2g", latency=0.3, bandwidth=30_000, outage="stall", every=(10, 30), lasting=(2, 10)
    ),
    "dead_zone": Profile(
        "dead_zone", latency=0.1, outage="blackhole", every=(20, 60), lasting=(30, 120)
    ),
    "flapping": Profile("flapping", latency=0.05, outage="cut", every=(2, 6)),
}


def profile(name: str, scale: float = 1.0, **changes: object) -> Profile:
    """A named profile (PROFILES), its outages scaled by ``scale``, fields replaced."""
    if name not in PROFILES:
        raise ValueError(f"profile: unknown name {name!r}, one of {sorted(PROFILES)}")
    chosen = PROFILES[name].scaled(scale) if scale != 1.0 else PROFILES[name]
    return replace(chosen, **changes)  # type: ignore[arg-type]


@dataclass
class Outage:
    kind: str
    start: float
    end: float | None = None


@dataclass
class ConnRecord:
    """One connection through the link: when it opened, reached the upstream, when the link
    last read bytes from each side (a WebSocket peer's last bytes before it closes are its
    close frame), and when each side ended it (EOF or reset, as the link read it; None: it
    did not)."""

    id: int
    opened: float
    upstream: float | None = None
    client_last: float | None = None
    server_last: float | None = None
    client_closed: float | None = None
    server_closed: float | None = None
    cut: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0


class _End:
    """The end of one direction's stream: a FIN (``reset`` False) or a reset."""

    def __init__(self, reset: bool) -> None:
        self.reset = reset


class _Channel:
    """One direction's bytes between reading and writing: in order, each with the time it
    may leave (its latency); at most ``cap`` bytes (then the reader waits: backpressure)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.size = 0
        self.items: deque[tuple[float, bytes | _End]] = deque()
        self._cond = asyncio.Condition()

    async def put(self, item: bytes | _End, due: float) -> None:
        async with self._cond:
            if isinstance(item, bytes):
                await self._cond.wait_for(lambda: self.size < self.cap)
                self.size += len(item)
            self.items.append((due, item))
            self._cond.notify_all()

    async def first(self) -> tuple[float, bytes | _End]:
        """The oldest item, left in place (it counts as held until :meth:`done`)."""
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self.items))
            return self.items[0]

    async def done(self) -> None:
        """The oldest item was written on."""
        async with self._cond:
            _, item = self.items.popleft()
            if isinstance(item, bytes):
                self.size -= len(item)
            self._cond.notify_all()


class _Bucket:
    """A token bucket: ``rate`` bytes/s, bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1500, int(rate / 50))
        self.tokens = float(self.burst)
        self.at = time.monotonic()

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        self.tokens -= n
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)  # the shaping itself


def _reset(writer: asyncio.StreamWriter) -> None:
    """Abort the connection with a RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    record: ConnRecord
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    channels: tuple[_Channel, ...] = ()


@dataclass
class Link:
    """A TCP proxy on ``host``:(a free port) to ``upstreams`` (taken in turn, a refusing one
    skipped), shaped by ``profile`` (None: piped straight through). Outages follow the
    profile once :meth:`run_outages` runs; :meth:`hold`, :meth:`release` and :meth:`cut`
    make them by hand."""

    upstreams: list[tuple[str, int]]
    profile: Profile | None = None
    rng: random.Random = field(default_factory=random.Random)
    host: str = "127.0.0.1"
    port: int = 0
    bytes_up: int = 0  # client -> upstream, written
    bytes_down: int = 0  # upstream -> client, written
    cuts: int = 0
    refused: int = 0  # connections no upstream took
    outages: list[Outage] = field(default_factory=list)
    conns: list[ConnRecord] = field(default_factory=list)
    routed: list[int] = field(default_factory=list)  # connections per upstream
    _next: int = 0
    _passing: asyncio.Event = field(default_factory=asyncio.Event)
    _live: set[_Conn] = field(default_factory=set)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("Link: upstreams must name at least one host:port")
        self.routed = [0] * len(self.upstreams)
        self._passing.set()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return self.url + WS_PATH

    @property
    def connections(self) -> int:
        return len(self.conns)

    @property
    def held(self) -> bool:
        return not self._passing.is_set()

    def held_bytes(self) -> int:
        """Bytes read and not yet written, over every connection (at most twice the
        buffer per connection)."""
        return sum(chan.size for c in self._live for chan in c.channels)

    async def start(self) -> Link:
        self.port = free_port(self.host)
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._passing.set()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # ------------------------------------------------------------------ outages
    def hold(self, kind: str = "blackhole") -> Outage:
        """Forward nothing (bytes, FIN, reset) either way until :meth:`release`."""
        if self.held:
            return self.outages[-1]
        outage = Outage(kind, time.monotonic())
        self.outages.append(outage)
        self._passing.clear()
        return outage

    def release(self) -> None:
        """End a hold: what was held goes on, in order."""
        if self.held:
            self.outages[-1].end = time.monotonic()
            self._passing.set()

    def cut(self) -> int:
        """Reset every connection through the link, both sides; returns how many."""
        now = time.monotonic()
        self.cuts += 1
        self.outages.append(Outage("cut", now, now))
        cut = list(self._live)
        for conn in cut:
            conn.record.cut = now
            _reset(conn.client)
            if conn.upstream is not None:
                _reset(conn.upstream)
            if conn.task is not None:
                conn.task.cancel()
        return len(cut)

    async def run_outages(self, stop: asyncio.Event) -> None:
        """The profile's outages, one after another, until ``stop`` is set; an outage under
        way then runs to its end."""
        p = self.profile
        if p is None or p.outage is None:
            return
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*p.every))
            if stop.is_set():
                return
            if p.outage == "cut":
                self.cut()
                continue
            self.hold(p.outage)
            try:
                await asyncio.sleep(self.rng.uniform(*p.lasting))  # the outage itself
            finally:
                self.release()

    # ------------------------------------------------------------------ connections
    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.upstreams)):
            index = self._next
            self._next = (self._next + 1) % len(self.upstreams)
            host, port = self.upstreams[index]
            try:
                pair = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            except (OSError, TimeoutError):
                continue
            self.routed[index] += 1
            return pair
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        record = ConnRecord(len(self.conns) + 1, time.monotonic())
        self.conns.append(record)
        conn = _Conn(record, writer, task=task)
        self._live.add(conn)
        try:
            if self.profile is None or not self.profile.shapes:
                await self._plain(conn, reader)
            else:
                await self._shaped(conn, reader, self.profile)
        except asyncio.CancelledError:
            pass  # cut, or the link stops
        finally:
            self._live.discard(conn)
            for side in (conn.upstream, writer):
                if side is not None:
                    side.close()
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(side.wait_closed(), 1)
            self._tasks.discard(task)

    async def _plain(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        """Straight through: when either side ends, the other is closed too."""
        upstream = await self._connect()
        if upstream is None:
            self.refused += 1
            return
        up_reader, conn.upstream = upstream
        conn.record.upstream = time.monotonic()
        up = asyncio.ensure_future(self._pipe(reader, conn.upstream, conn.record, True))
        down = asyncio.ensure_future(self._pipe(up_reader, conn.client, conn.record, False))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            down.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(up, down, return_exceptions=True)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: ConnRecord,
        upward: bool,
    ) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(CHUNK):
                writer.write(data)
                await writer.drain()
                self._count(record, upward, len(data))
        self._ended(record, upward)

    def _count(self, record: ConnRecord, upward: bool, n: int) -> None:
        if upward:
            self.bytes_up += n
            record.bytes_up += n
        else:
            self.bytes_down += n
            record.bytes_down += n

    @staticmethod
    def _ended(record: ConnRecord, upward: bool) -> None:
        """The side that ``upward`` reads from ended its stream (now, as the link saw it)."""
        now = time.monotonic()
        if upward and record.client_closed is None:
            record.client_closed = now
        elif not upward and record.server_closed is None:
            record.server_closed = now

    async def _shaped(self, conn: _Conn, reader: asyncio.StreamReader, p: Profile) -> None:
        up_chan, down_chan = conn.channels = (_Channel(p.buffer), _Channel(p.buffer))
        read_client = asyncio.ensure_future(self._read(reader, up_chan, conn, True, p))
        tasks: list[asyncio.Future[None] | asyncio.Future[bool]] = [read_client]
        try:
            await self._passing.wait()  # a connection opened in a hold reaches nobody yet
            if conn.record.client_closed is not None:
                return  # its client gave up before the link came back: its SYN never arrived
            upstream = await self._connect()
            if upstream is None:
                self.refused += 1
                _reset(conn.client)
                return
            up_reader, conn.upstream = upstream
            conn.record.upstream = time.monotonic()
            tasks += [
                asyncio.ensure_future(self._read(up_reader, down_chan, conn, False, p)),
            ]
            writers = [
                asyncio.ensure_future(self._write(up_chan, conn.upstream, conn, True, p)),
                asyncio.ensure_future(self._write(down_chan, conn.client, conn, False, p)),
            ]
            tasks += writers
            # Each direction ends on its own (a FIN is a half-close); a reset delivered or a
            # write that failed ends the connection.
            pending = set(writers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not all(t.result() for t in done):
                    break
        finally:
            for t in tasks:
                t.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(
        self,
        reader: asyncio.StreamReader,
        chan: _Channel,
        conn: _Conn,
        upward: bool,
        p: Profile,
    ) -> None:
        reset = False
        try:
            while data := await reader.read(min(CHUNK, p.buffer)):
                now = time.monotonic()
                if upward:
                    conn.record.client_last = now
                else:
                    conn.record.server_last = now
                await chan.put(data, now + p.latency)  # waits while full
        except (OSError, ConnectionError):
            reset = True
        self._ended(conn.record, upward)
        await chan.put(_End(reset), time.monotonic() + p.latency)

    async def _write(
        self,
        chan: _Channel,
        writer: asyncio.StreamWriter,
        conn: _Conn,
        upward: bool,
        p: Profile,
    ) -> bool:
        """Write what ``chan`` holds, shaped; True once a FIN was passed on, False after a
        reset or a failed write."""
        bucket = None if p.bandwidth is None else _Bucket(p.bandwidth)
        with contextlib.suppress(OSError, ConnectionError):
            while True:
                due, item = await chan.first()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the latency itself
                await self._passing.wait()
                if isinstance(item, _End):
                    if item.reset:
                        _reset(writer)
                        return False
                    if writer.can_write_eof():
                        writer.write_eof()
                        await writer.drain()
                    return True
                step = len(item) if bucket is None else bucket.burst
                for at in range(0, len(item), step):
                    piece = item[at : at + step]
                    if bucket is not None:
                        await bucket.take(len(piece))
                    await self._passing.wait()  # a hold may begin mid-chunk
                    writer.write(piece)
                    await writer.drain()
                    self._count(conn.record, upward, len(piece))
                await chan.done()
        return False
