"""A gateway in this process, on a loopback port: for the tests and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from tocsin.core.settings import Settings
from tocsin.core.supervisor import free_port

from .app import create_app
from .context import Gateway
from .handler import GATEWAY, WS_PATH


@dataclass
class LocalGateway:
    settings: Settings
    runner: web.AppRunner
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{WS_PATH}"

    @property
    def gw(self) -> Gateway:
        return self.runner.app[GATEWAY]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_local_gateway(settings: Settings) -> LocalGateway:
    """``create_app(settings)`` served on a free loopback port, started (NATS connected)."""
    runner = web.AppRunner(
        create_app(settings),
        shutdown_timeout=settings.shutdown_grace_seconds,
        keepalive_timeout=settings.handshake_timeout_seconds,  # as `tocsin gateway` does
    )
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return LocalGateway(settings, runner, port)
