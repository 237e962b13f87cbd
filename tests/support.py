"""Test helpers: a gateway in this process or in its own, a WebSocket client, alert builders."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import orjson
from nats.js import JetStreamContext
from nats.js.api import PubAck

from tocsin.core.auth import mint_token
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.supervisor import (
    Child,
    ChildFailed,
    free_port,
    port_open,
    settings_env,
    tocsin_argv,
)
from tocsin.gateway.local import LocalGateway, start_local_gateway
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import Alert
from tocsin.schemas.samples import alert_body

DEADLINE = 10.0


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = DEADLINE,
    what: str = "condition",
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds (never sleep to sync)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


alert = alert_body  # one builder for tests, benchmarks and demos (tocsin.schemas.samples)


async def append(js: JetStreamContext, names: Names, body: dict[str, Any]) -> PubAck:
    """Append straight to ALERTS, as the ingest service would."""
    return await append_alert(js, names, Alert.model_validate(body))


def token(
    sub: str = "alice",
    regions: tuple[str, ...] = ("KE",),
    roles: tuple[str, ...] = ("health_worker",),
    ttl: float = 3600,
    secret: str | None = None,
) -> str:
    from .conftest import SECRET

    return mint_token(secret or SECRET, sub, roles=roles, regions=regions, ttl_seconds=ttl)


#: A gateway in this process (tocsin.gateway.local): the tests' and the benchmarks' one.
RunningGateway = LocalGateway
start_gateway = start_local_gateway


def spawn_tocsin(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m tocsin <args>`` as a process of its own, its output appended to ``log``."""
    proc = Child(f"tocsin {args[0]}", tocsin_argv(*args), env, log).start().proc
    assert proc is not None
    return proc


@dataclass
class GatewayProcess:
    """``python -m tocsin gateway`` as a real process; it keeps its port across
    ``kill()`` and ``start()`` (the chaos suite restarts gateways in place)."""

    port: int
    log: Path
    env: dict[str, str]
    child: Child | None = None

    @classmethod
    def spawn(cls, settings: Settings, log: Path) -> GatewayProcess:
        """A gateway on a free port, started and listening."""
        running = cls(free_port(), log, settings_env(settings))
        running.start()
        running.wait_up(20)
        return running

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.child is None else self.child.proc

    def start(self) -> None:
        env = self.env | {"TOCSIN_HTTP_PORT": str(self.port)}
        self.child = Child("gateway", tocsin_argv("gateway"), env, self.log).start()

    def wait_up(self, timeout: float = 30) -> None:
        assert self.child is not None
        try:
            self.child.wait_ready(lambda: port_open("127.0.0.1", self.port), timeout, "listening")
        except ChildFailed as exc:
            self.stop()
            raise AssertionError(f"gateway :{self.port} did not start: {exc}") from None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/alerts/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        return None if self.child is None else self.child.stop(timeout, sig)

    def kill(self) -> None:
        """``kill -9``: no goodbye to clients or NATS."""
        if self.child is not None:
            self.child.kill()


@dataclass
class Client:
    """A WebSocket client that records frames; the protocol's pings are answered unless told
    not to (``answer_pings``), WebSocket pings by aiohttp (a SilentClient answers neither)."""

    autoping: ClassVar[bool] = True

    ws: aiohttp.ClientWebSocketResponse
    session: aiohttp.ClientSession
    answer_pings: bool = True
    frames: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_code: int | None = None
    reader: asyncio.Task[None] | None = None
    established: bool = False  # connection_established came

    @classmethod
    async def connect(
        cls,
        url: str,
        tok: str,
        client_id: str = "phone",
        ack_mode: str = "client",
        **extra: str,
    ) -> Client:
        session = aiohttp.ClientSession()
        params = {"auth_token": tok, "client_id": client_id, "ack_mode": ack_mode, **extra}
        ws = await session.ws_connect(url, params=params, autoping=cls.autoping)
        client = cls(ws, session)
        client.answer_pings = cls.autoping
        client.reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is aiohttp.WSMsgType.TEXT:
                frame = orjson.loads(msg.data)
                if frame["type"] == "ping" and self.answer_pings:
                    await self.send({"type": "pong", "ts": frame["ts"]})
                    continue
                self.established = self.established or frame["type"] == "connection_established"
                await self.frames.put(frame)
        self.close_code = self.ws.close_code
        self.closed.set()

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send_str(orjson.dumps(frame).decode())

    async def next(self, kind: str | None = None, timeout: float = DEADLINE) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind or 'frame'} within {timeout}s")
            if self.frames.empty() and self.closed.is_set():
                # Nothing more can come: say how it ended instead of waiting out the deadline.
                raise AssertionError(f"no {kind or 'frame'}: the socket closed ({self.close_code})")
            getting = asyncio.ensure_future(self.frames.get())
            closing = asyncio.ensure_future(self.closed.wait())
            try:
                await asyncio.wait(
                    {getting, closing}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                closing.cancel()
                if not getting.done():
                    getting.cancel()
            if not getting.done() or getting.cancelled():
                continue  # closed (said above, once the queue is read) or the deadline
            frame = getting.result()
            if kind is None or frame["type"] == kind:
                return frame

    async def alerts(
        self, n: int, ack: bool = False, timeout: float = DEADLINE
    ) -> list[dict[str, Any]]:
        got = []
        for _ in range(n):
            frame = await self.next("alert", timeout)
            got.append(frame)
            if ack:
                await self.send({"type": "ack", "seq": frame["seq"]})
        return got

    async def nothing_more(self, within: float = 0.5) -> None:
        """Assert that no alert arrives within ``within`` seconds (a negative check)."""
        try:
            frame = await self.next("alert", within)
        except (AssertionError, TimeoutError):
            return
        raise AssertionError(f"unexpected alert: {frame}")

    @classmethod
    async def introduce(cls, url: str, tok: str, **kw: str) -> None:
        """Connect once and leave: the device's queue exists and starts at the live edge."""
        client = await cls.connect(url, tok, **kw)
        await client.next("connection_established")
        await client.close()

    async def close(self) -> None:
        await self.ws.close()
        if self.reader:
            await asyncio.wait_for(self.reader, DEADLINE)
        await self.session.close()

    async def wait_closed(self, timeout: float = DEADLINE) -> int | None:
        await asyncio.wait_for(self.closed.wait(), timeout)
        return self.close_code


class SilentClient(Client):
    """A client that answers no ping of either kind: the protocol's nor WebSocket ones."""

    autoping: ClassVar[bool] = False


async def handshake(url: str, **params: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, JSON body and headers of a refused handshake (101, {}, {} if it opened: then
    it is closed at once)."""
    return await handshake_with(url, {}, params)


async def handshake_with(
    url: str, headers: dict[str, str], params: dict[str, str]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """:func:`handshake` with request ``headers`` (e.g. ``Origin``)."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(url, params=params, headers=headers):
                return 101, {}, {}
        except aiohttp.WSServerHandshakeError as exc:
            # The same request again, for the body; the answer may differ if the state
            # changed in between (a slot freed): then no body, and the caller asks again.
            async with http.get(url, params=params, headers=headers) as resp:
                if resp.status != exc.status or resp.content_type != "application/json":
                    return exc.status, {}, {}
                return exc.status, await resp.json(), dict(resp.headers)


@contextlib.asynccontextmanager
async def reading_stopped(
    ws: aiohttp.ClientWebSocketResponse, session: Any, every: float
) -> AsyncIterator[None]:
    """The client stops reading its socket (what the gateway writes fills the kernel's
    buffers) but goes on sending bare protocol pongs every ``every`` seconds (its own timer,
    not a sync) until ``session`` ends; its socket is aborted on the way out."""
    conn = ws._conn
    assert conn is not None and conn.transport is not None
    transport = conn.transport
    transport.pause_reading()

    async def bare_pongs() -> None:
        while not session.finished.is_set():
            await ws.send_str('{"type":"pong"}')
            await asyncio.sleep(every)

    ponger = asyncio.create_task(bare_pongs())
    try:
        yield
    finally:
        ponger.cancel()
        await asyncio.gather(ponger, return_exceptions=True)
        transport.abort()


def session_of(running: RunningGateway, user: str, client_id: str | None = None) -> Any:
    """The one open session of ``user`` (and ``client_id``) in an in-process gateway."""
    [session] = [
        s
        for s in running.gw.sessions
        if s.device.user_id == user and client_id in (None, s.device.client_id)
    ]
    return session


async def run_tocsin(
    settings: Settings, *args: str, cwd: Path | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """``python -m tocsin ARGS`` with ``settings``, as a process of its own (this event loop
    stays free: an in-process gateway answers meanwhile); exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tocsin",
        *args,
        env=settings_env(settings),
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
