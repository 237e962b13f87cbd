"""A 3-node NATS JetStream cluster on loopback per test: nodes are killed and restarted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

from tocsin.core.embedded import NatsCluster
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from ..conftest import SECRET
from ..support import RunningGateway, append, start_gateway


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "cluster", size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Stack:
    cluster: NatsCluster
    gateway: RunningGateway
    nc: NatsClient
    js: JetStreamContext
    names: Names


@pytest.fixture
async def stack(nats_cluster: NatsCluster, tmp_path: Path) -> AsyncIterator[Stack]:
    """The cluster with ALERTS and DEVICES at R3, device queues at R1, and a gateway."""
    settings = Settings(
        nats_url=nats_cluster.urls,
        namespace="rb",
        jwt_secret=SECRET,
        http_port=0,
        data_dir=tmp_path / "data",
        replicas=3,
        device_replicas=1,
        checkpoint_seconds=0.2,
        shutdown_grace_seconds=5,
        offline_queue_max=1_000_000,  # never truncated: every alert must be delivered
    )
    names = Names("rb")
    nc = await nats.connect(nats_cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await apply_topology(js, settings, names)
    running = await start_gateway(settings)
    try:
        yield Stack(nats_cluster, running, nc, js, names)
    finally:
        await running.stop()
        await nc.close()


async def append_until_acked(
    js: JetStreamContext, names: Names, body: dict[str, Any], timeout: float = 30
) -> PubAck:
    """Append as an engine must on a cluster: a stream whose leader died elects a new one
    (measured 4-6 s) and publishes meanwhile time out; retry the same ``alert_id`` (deduped)
    until a PubAck, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await append(js, names, body)
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)  # a retry's pace, not a synchronisation


async def host_of(stack: Stack, consumer: str) -> int:
    """The index of the node holding ``consumer`` (an R1 device queue)."""
    info = await stack.js.consumer_info(stack.names.alerts_stream, consumer)
    assert info.cluster is not None and info.cluster.leader
    return [n.name for n in stack.cluster.nodes].index(info.cluster.leader)
