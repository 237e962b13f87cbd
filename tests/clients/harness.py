"""What the client tests share: a gateway in a process of its own (so it can be killed and
started again on its port), alerts appended to ALERTS while it is down, tokens; and a small
HTTP control server through which a test in another language (the JavaScript client's, under
``node --test``) asks for the same."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import GatewayProcess, alert, append, token

ROOT = Path(__file__).resolve().parents[2]
JS_DIR = ROOT / "clients" / "js"


@dataclass
class Harness:
    gateway: GatewayProcess
    js: JetStreamContext
    names: Names
    settings: Settings

    async def publish(self, body: dict[str, Any]) -> int:
        """Append to ALERTS as the ingest service does (works while the gateway is down)."""
        ack = await append(self.js, self.names, body)
        return ack.seq

    async def stop_gateway(self, sig: int = signal.SIGTERM) -> None:
        await asyncio.to_thread(self.gateway.stop, sig)

    async def start_gateway(self) -> None:
        await asyncio.to_thread(self.gateway.start)
        await asyncio.to_thread(self.gateway.wait_up, 30)


def control_app(h: Harness) -> web.Application:
    """The control server a test in another process drives the harness with."""

    async def mint(request: web.Request) -> web.Response:
        q = request.query
        tok = token(
            q.get("sub", "alice"),
            regions=tuple(r for r in q.get("regions", "KE").split(",") if r),
            roles=tuple(q.get("roles", "health_worker").split(",")),
            ttl=float(q.get("ttl", "3600")),
        )
        return web.Response(text=tok)

    async def publish(request: web.Request) -> web.Response:
        fields = await request.json()
        body = alert(fields.pop("region", "KE-30"), **fields)
        return web.json_response({"seq": await h.publish(body), "alert_id": body["alert_id"]})

    async def stop(request: web.Request) -> web.Response:
        sig = signal.SIGKILL if request.query.get("signal") == "KILL" else signal.SIGTERM
        await h.stop_gateway(sig)
        return web.json_response({"stopped": True})

    async def start(request: web.Request) -> web.Response:
        await h.start_gateway()
        return web.json_response({"started": True})

    app = web.Application()
    app.router.add_get("/token", mint)
    app.router.add_post("/publish", publish)
    app.router.add_post("/gateway/stop", stop)
    app.router.add_post("/gateway/start", start)
    return app


async def serve_control(h: Harness) -> AsyncGenerator[str, None]:
    runner = web.AppRunner(control_app(h))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def need_tool(name: str, why: str) -> str:
    """The path of ``name``, or a loud skip of this test only."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed: {why} NOT RUN (install {name} to run them)"
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)
    return found


def install_ws() -> None:
    """``npm ci`` in clients/js (its own git-ignored node_modules) when ``ws`` is missing or
    the lock file changed since."""
    npm = need_tool("npm", "the JavaScript client's tests need the `ws` package;")
    stamp = JS_DIR / "node_modules" / ".package-lock.json"
    lock = JS_DIR / "package-lock.json"
    if stamp.exists() and stamp.stat().st_mtime >= lock.stat().st_mtime:
        return
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_DIR,
        check=True,
        timeout=300,
    )
