"""TOCSIN_EVENT_LOOP: the gateway runs on uvloop where it is installed (a dependency)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import uvloop

from tocsin.cli.services import use_event_loop
from tocsin.core.settings import isolated_settings


@pytest.fixture
def policy() -> Iterator[None]:
    before = asyncio.get_event_loop_policy()
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(before)


def test_auto_and_uvloop_install_uvloops_policy(policy: None) -> None:
    for choice in ("auto", "uvloop"):
        asyncio.set_event_loop_policy(None)
        assert use_event_loop(isolated_settings(event_loop=choice)) == "uvloop"
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)


def test_asyncio_leaves_the_default_policy(policy: None) -> None:
    asyncio.set_event_loop_policy(None)
    assert use_event_loop(isolated_settings(event_loop="asyncio")) == "asyncio"
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)


def test_an_unknown_loop_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="event_loop"):
        isolated_settings(event_loop="trio")
