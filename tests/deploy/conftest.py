"""What several deployment tests read: compose's services and Prometheus's configuration."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .compose import ROOT, load

PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    """compose.yaml's services (test_compose.py reads them from its own validated model)."""
    return load()["services"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    data = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert isinstance(data, dict)
    return data
