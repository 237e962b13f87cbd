"""deploy/tocsin/healthcheck.py, the containers' health check, against a real gateway and a
real ingest service (the image runs it as ``tocsin-healthcheck``)."""

from __future__ import annotations

import asyncio
import os
import sys

from faststream import FastStream
from nats.js import JetStreamContext

from tocsin.core.embedded import free_port
from tocsin.core.settings import Settings
from tocsin.ingest.app import create_app

from ..support import RunningGateway, eventually
from .compose import ROOT

SCRIPT = ROOT / "deploy" / "tocsin" / "healthcheck.py"


async def healthcheck(*args: str, settings: Settings | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOCSIN_")}
    if settings is not None:
        env["TOCSIN_NATS_URL"] = ",".join(settings.nats_url)
        env["TOCSIN_NAMESPACE"] = settings.namespace
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 30)


async def test_http_mode_is_healthy_only_when_the_url_answers_200(
    gateway: RunningGateway,
) -> None:
    assert await healthcheck(f"{gateway.http}/readyz") == 0
    assert await healthcheck(f"{gateway.http}/no-such-route") == 1
    assert await healthcheck(f"http://127.0.0.1:{free_port()}/readyz") == 1
    assert await healthcheck() == 2
    assert await healthcheck(f"{gateway.http}/readyz", "1") == 2


async def test_ingest_mode_is_healthy_only_while_an_ingest_service_pulls(
    settings: Settings, js: JetStreamContext
) -> None:
    assert await healthcheck("ingest", "1", settings=settings) == 1  # no durable yet
    app: FastStream = create_app(settings, list(settings.nats_url))
    await app.start()
    try:
        assert await healthcheck("ingest", "1", settings=settings) == 0
    finally:
        await app.stop()

    async def unhealthy() -> bool:
        return await healthcheck("ingest", "1", settings=settings) == 1

    await eventually(unhealthy, timeout=15, what="unhealthy once ingest stopped")
