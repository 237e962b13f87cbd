"""Streams on a 3-node cluster: replicated on every node, created by concurrent starters."""

from __future__ import annotations

import asyncio

import nats
import pytest

from tocsin.core.embedded import NatsCluster
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from ..conftest import SECRET

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


async def test_concurrent_starters_create_replicated_streams(nats_cluster: NatsCluster) -> None:
    """The gateway and the ingest service apply the topology at the same moment. On a
    cluster one of two concurrent creations of a stream gets no answer (measured): both
    starters must still come up, and every stream ends at 3 replicas on 3 nodes."""
    settings = Settings(nats_url=nats_cluster.urls, replicas=3, jwt_secret=SECRET)
    names = Names("racing")
    clients = [await nats.connect(url) for url in nats_cluster.urls[:2]]
    try:
        await asyncio.gather(*(apply_topology(nc.jetstream(), settings, names) for nc in clients))
        js = clients[0].jetstream()
        for stream in (names.ingest_stream, names.alerts_stream, names.dlq_stream):
            info = await js.stream_info(stream)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
    finally:
        for nc in clients:
            await nc.close()
