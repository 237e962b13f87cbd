"""A 3-node NATS JetStream cluster on loopback per test: nodes are killed and restarted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tocsin.core.embedded import NatsCluster


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "cluster", size=3).start()
    try:
        yield cluster
    finally:
        cluster.stop()
