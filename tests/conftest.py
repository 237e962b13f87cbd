"""Fixtures: a real nats-server per test session, a real gateway per test, real sockets.

NATS comes from, in order: ``TOCSIN_NATS_URL`` (an external server), a testcontainers
NATS container when ``TOCSIN_TEST_NATS=docker``, or a nats-server process from the
pinned wheel on a free loopback port with a temp store (the default). Every test gets
its own namespace, so streams and subjects never collide between tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tocsin.core.embedded import NatsServer
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from .support import GatewayProcess, RunningGateway, start_gateway

SECRET = "test-secret-0123456789abcdef-0123456789"


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("TOCSIN_NATS_URL")
    if external:
        yield external
        return
    if os.environ.get("TOCSIN_TEST_NATS") == "docker":
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:
            yield container.nats_uri()
        return
    store = tmp_path_factory.mktemp("nats")
    server = NatsServer(store_dir=store, log_file=store / "nats.log").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def namespace() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def make_settings(nats_url: str, namespace: str, tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "nats_url": [nats_url],
            "namespace": namespace,
            "jwt_secret": SECRET,
            "http_port": 0,
            "data_dir": tmp_path / "data",
            "heartbeat_seconds": 30,
            "redelivery_backoff": [1.0, 2.0, 4.0],
            "checkpoint_seconds": 0.2,
            "shutdown_grace_seconds": 5,
            "ingest_metrics_port": 0,  # no fixed port in tests; the metrics test picks one
            # The limits' own tests set them; elsewhere a test may open many connections of
            # one user and send many frames.
            "max_connections_per_user": 1000,
            "max_messages_per_minute": 60_000,
            "rate_limit_burst": 10_000,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def names(namespace: str) -> Names:
    return Names(namespace)


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def js(nc: Client, settings: Settings, names: Names) -> JetStreamContext:
    context = nc.jetstream()
    await apply_topology(context, settings, names)
    return context


@pytest.fixture
async def gateway(settings: Settings, js: JetStreamContext) -> AsyncIterator[RunningGateway]:
    running = await start_gateway(settings)
    yield running
    await running.stop()


@pytest.fixture
def gateway_process(tmp_path: Path) -> Iterator[Callable[[Settings], GatewayProcess]]:
    started: list[GatewayProcess] = []

    def spawn(settings: Settings) -> GatewayProcess:
        proc = GatewayProcess.spawn(settings, tmp_path / f"gateway-{len(started)}.log")
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()
