"""The ceiling: a bare aiohttp broadcaster that keeps nothing, for ``tocsin bench``.

Issue 4 measures tocsin against "the same clients against a bare aiohttp broadcaster that
keeps nothing (fan-out in memory, one send per socket)", so that the cost of durability
is a ratio, not a guess. This is that broadcaster. It speaks the part of tocsin's protocol
the load generator's clients use, and nothing more:

``GET /api/v1/alerts/ws``
    tocsin's path; any query is accepted and no token is checked. The socket gets a
    ``connection_established`` frame shaped like tocsin's (``pending`` 0), then the
    alerts broadcast while it is open, and a ``ping`` every ``--heartbeat`` seconds.
    Whatever the client sends (acks, pongs) is read and dropped.
``POST /broadcast``
    The body is one alert as JSON. It gets the next ``seq``; its ``alert`` frame is built
    once, with tocsin's own :func:`tocsin.gateway.live.alert_frame`, and written to every
    open socket in turn with ``ws.send_frame(frame, WSMsgType.TEXT)``, the call tocsin's
    session sender makes. The answer, ``{"seq": n, "sockets": k}``, comes once every
    socket has been written to (timestamp before the request, not after the answer).
``POST /broadcast?count=N``
    The body is a JSON array of N alerts, broadcast in order (each re-encoded once with
    orjson, compactly). The answer: ``{"seq": last, "first_seq": first, "count": N,
    "sockets": k}``.
``GET /healthz``
    ``{"sockets": k}``.

Run it as its own process, so that its CPU and memory are measured apart from the
clients'::

    python -m tocsin.bench.ceiling --host 127.0.0.1 --port 8099 [--heartbeat 30]

It prints ``ceiling listening on HOST:PORT`` (the bound port, also with ``--port 0``) once
it accepts connections, and stops on SIGTERM or SIGINT, closing every socket with 1001.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator

import orjson
from aiohttp import WSCloseCode, WSMsgType, web

from tocsin.gateway.live import alert_frame

WS_PATH = "/api/v1/alerts/ws"
#: The same limit tocsin's gateway gives aiohttp (``handler.HARD_FRAME_LIMIT``).
MAX_MSG_SIZE = 1024 * 1024


class Broadcaster:
    """The open sockets and the sequence counter; nothing else is kept."""

    def __init__(self, heartbeat: float) -> None:
        self.heartbeat = heartbeat
        self.sockets: set[web.WebSocketResponse] = set()
        self.seq = 0
        # one fan-out at a time: every socket sees the alerts in seq order
        self.lock = asyncio.Lock()

    async def fan_out(self, data: bytes) -> int:
        """Send one alert to every open socket; its seq."""
        self.seq += 1
        frame = alert_frame(self.seq, data, False)
        for ws in tuple(self.sockets):
            try:
                await ws.send_frame(frame, WSMsgType.TEXT)
            except ConnectionError:
                self.sockets.discard(ws)  # going away; its handler finishes on its own
        return self.seq

    async def pinger(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            frame = orjson.dumps({"type": "ping", "ts": time.time()})
            for ws in tuple(self.sockets):
                with contextlib.suppress(ConnectionError):
                    await ws.send_frame(frame, WSMsgType.TEXT)

    # ------------------------------------------------------------------ handlers
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG_SIZE, autoping=True)
        await ws.prepare(request)
        query = request.query
        ack_mode = query.get("ack_mode", "client")
        hello = {
            "type": "connection_established",
            "connection_id": uuid.uuid4().hex,
            "user_id": "ceiling",
            "client_id": query.get("client_id", "default"),
            "ack_mode": ack_mode if ack_mode in ("client", "auto") else "client",
            "heartbeat_interval": self.heartbeat,
            "pending": 0,
            "regions": [],
            "groups": [],
            "filters": {},
        }
        await ws.send_frame(orjson.dumps(hello), WSMsgType.TEXT)
        self.sockets.add(ws)
        try:
            async for _ in ws:  # acks and pongs: read, dropped
                pass
        finally:
            self.sockets.discard(ws)
        return ws

    async def broadcast(self, request: web.Request) -> web.Response:
        body = await request.read()
        count = request.query.get("count")
        if count is None:
            async with self.lock:
                seq = await self.fan_out(body)
            return web.json_response({"seq": seq, "sockets": len(self.sockets)})
        try:
            alerts = orjson.loads(body)
            n = int(count)
        except ValueError:
            return web.json_response({"error": "give count=N and a JSON array"}, status=400)
        if not isinstance(alerts, list) or len(alerts) != n or n < 1:
            return web.json_response(
                {"error": f"count={count} but the body is not a JSON array of that many alerts"},
                status=400,
            )
        encoded = [orjson.dumps(a) for a in alerts]
        async with self.lock:
            first = seq = self.seq + 1
            for data in encoded:
                seq = await self.fan_out(data)
        return web.json_response(
            {"seq": seq, "first_seq": first, "count": n, "sockets": len(self.sockets)}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"sockets": len(self.sockets)})

    async def close_all(self, app: web.Application) -> None:
        await asyncio.gather(
            *(
                ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
                for ws in tuple(self.sockets)
            ),
            return_exceptions=True,
        )


def create_app(heartbeat: float = 30.0) -> web.Application:
    b = Broadcaster(heartbeat)
    app = web.Application()
    app.router.add_get(WS_PATH, b.websocket)
    app.router.add_post("/broadcast", b.broadcast)
    app.router.add_get("/healthz", b.healthz)
    app.on_shutdown.append(b.close_all)

    async def pings(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(b.pinger()) if heartbeat > 0 else None
        yield
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.cleanup_ctx.append(pings)
    return app


async def serve(host: str, port: int, heartbeat: float) -> None:
    runner = web.AppRunner(create_app(heartbeat), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    print(f"ceiling listening on {host}:{runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown closes the sockets with 1001


def command(host: str, port: int, heartbeat: float) -> list[str]:
    """The command line that runs the ceiling as its own process."""
    return [
        sys.executable,
        "-m",
        "tocsin.bench.ceiling",
        "--host",
        host,
        "--port",
        str(port),
        "--heartbeat",
        str(heartbeat),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tocsin.bench.ceiling",
        description="A bare aiohttp WebSocket broadcaster: the ceiling tocsin is measured against.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0: any free port (printed)")
    parser.add_argument(
        "--heartbeat", type=float, default=30.0, help="seconds between pings; 0: none"
    )
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.heartbeat))


if __name__ == "__main__":
    main()
