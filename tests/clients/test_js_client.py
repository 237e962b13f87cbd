"""The JavaScript client (clients/js/tocsin.js) under Node's own test runner, against a real
gateway process and nats-server: ``node --test clients/js/test/`` with the gateway's URL and
the control harness in its environment (tests/clients/harness.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable

import pytest

from .harness import JS_DIR, Harness, install_ws, need_tool, serve_control


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_javascript_client_passes_its_node_tests(harness: Harness, control: str) -> None:
    await node_test(harness, control, "client.test.js")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_javascript_client_honours_retry_after(make_harness: Callable[..., Harness]) -> None:
    capped = make_harness(max_connections_per_user=1)
    control: AsyncGenerator[str, None] = serve_control(capped)
    url = await anext(control)
    try:
        await node_test(capped, url, "limits.test.js")
    finally:
        await control.aclose()


async def node_test(harness: Harness, control: str, *files: str) -> None:
    """``node --test`` on ``files`` of clients/js/test, against ``harness``'s gateway."""
    node = need_tool("node", "the JavaScript client's tests (clients/js/test) are")
    install_ws()
    env = os.environ | {
        "TOCSIN_TEST_WS_URL": harness.gateway.ws_url,
        "TOCSIN_TEST_HTTP": harness.gateway.http,
        "TOCSIN_TEST_CONTROL": control,
    }
    proc = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=spec",
        "--test-concurrency=1",
        *(f"test/{name}" for name in files),
        cwd=JS_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    text = out.decode()
    print(text)
    assert proc.returncode == 0, f"node --test failed:\n{text}"
    assert "# fail 0" in text or "ℹ fail 0" in text, text
