"""Fixtures of the client tests: a gateway process of their own and the control harness."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from ..support import GatewayProcess
from .harness import Harness, serve_control


@pytest.fixture
def make_harness(
    make_settings: Callable[..., Settings],
    gateway_process: Callable[[Settings], GatewayProcess],
    js: JetStreamContext,
    names: Names,
) -> Callable[..., Harness]:
    def make(**overrides: object) -> Harness:
        # short heartbeats: pings (and the client's pongs) within a test's time; the
        # development sign-in on, as under `tocsin run` (the tests talk over loopback)
        values: dict[str, object] = {
            "heartbeat_seconds": 1.0,
            "dev_sign_in": True,
            "stats_cache_seconds": 0,
        }
        settings = make_settings(**(values | overrides))
        return Harness(gateway_process(settings), js, names, settings)

    return make


@pytest.fixture
def harness(make_harness: Callable[..., Harness]) -> Harness:
    return make_harness()


@pytest.fixture
async def control(harness: Harness) -> AsyncIterator[str]:
    async for url in serve_control(harness):
        yield url
