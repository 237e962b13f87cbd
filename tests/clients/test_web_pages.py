"""The browser page (GET /) and the operator dashboard (GET /dashboard) in a real Chromium
(Debian's ``chromium``, driven by Playwright; no browser is downloaded), against a real
gateway process and nats-server. A screenshot of each page, at a desktop and a phone-sized
viewport, is kept in ``test-artifacts/`` (git-ignored; the paths are printed)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ..support import Client, alert, eventually, token
from .harness import ROOT, Harness

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ARTIFACTS = Path(os.environ.get("TOCSIN_TEST_ARTIFACTS", ROOT / "test-artifacts"))
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
#: What Chromium needs here: no sandbox (root in a container), no GPU, nothing fetched from
#: the network on its own (updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000


def chromium_path() -> str:
    found = os.environ.get("TOCSIN_CHROMIUM") or shutil.which("chromium")
    if found is None:
        message = (
            "chromium is not installed: the browser tests (tests/clients/test_web_pages.py) "
            "are NOT RUN. Install it (Debian: apt-get install chromium; .ci/run does)"
        )
        print(f"\n*** {message} ***", file=sys.stderr)
        pytest.skip(message)
    return found


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Any]:
    path = chromium_path()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("the playwright package is missing: pip install -e '.[test]'")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@pytest.fixture
async def new_page(browser: Any) -> AsyncIterator[Callable[..., Any]]:
    contexts: list[Any] = []
    errors: list[str] = []

    async def make(viewport: dict[str, int] = DESKTOP) -> Any:
        context = await browser.new_context(viewport=viewport)
        contexts.append(context)
        page = await context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


async def screenshot(page: Any, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)  # makes the folder
    print(f"screenshot: {path}")
    return path


def level_of(el_class: str) -> str:
    return next(c for c in el_class.split() if c.startswith("level-"))


async def signed_in(page: Any, h: Harness, tok: str, client_id: str = "browser") -> None:
    await page.goto(f"{h.gateway.http}/?client_id={client_id}#token={tok}")
    await page.wait_for_selector('#conn[data-state="open"]')


async def publish(h: Harness, **fields: Any) -> dict[str, Any]:
    body = alert(fields.pop("region", "KE-30"), **fields)
    await h.publish(body)
    return body


async def admin_stats(h: Harness) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token('ops', roles=('admin',))}"}
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{h.gateway.http}/api/v1/alerts/stats", headers=headers) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return body


async def test_dev_sign_in_and_an_alert_appears_shown_then_acked(
    harness: Harness, new_page: Callable[..., Any]
) -> None:
    page = await new_page()
    await page.goto(f"{harness.gateway.http}/?client_id=browser")
    # every form control has a label (accessibility), before and after signing in
    unlabelled = await page.evaluate(
        """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
             .filter(e => !(e.labels && e.labels.length)).map(e => e.id)"""
    )
    assert unlabelled == []
    await page.fill("#dev-user", "amina")
    await page.fill("#dev-regions", "KE")
    await page.click("#dev-form button[type=submit]")
    await page.wait_for_selector('#conn[data-state="open"]')
    assert "amina" in await page.inner_text("#who")
    await screenshot(page, "page-empty-desktop")

    sent = [
        await publish(harness, alert_level=level, title=f"A {level} alert", risk_score=0.9)
        for level in ("medium", "high", "emergency")
    ]
    for body in sent:
        el = await page.wait_for_selector(f'[data-alert-id="{body["alert_id"]}"]')
        assert level_of(await el.get_attribute("class")) == f"level-{body['alert_level']}"
        assert body["title"] in await el.inner_text()
    # newest first, and announced politely to screen readers
    first = await page.get_attribute("#alerts > li:first-child", "data-alert-id")
    assert first == str(sent[-1]["alert_id"])
    assert await page.get_attribute("#alerts", "aria-live") == "polite"

    async def acked() -> bool:
        return int((await admin_stats(harness))["acks"]) >= 1

    await eventually(acked, 20, "the page's ack of the alerts it showed")
    await screenshot(page, "page-alerts-desktop")
    await page.set_viewport_size(PHONE)
    await screenshot(page, "page-alerts-phone")
    # nothing wider than the phone's screen
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page is {width}px wide on a {PHONE['width']}px screen"


async def test_a_dropped_connection_shows_and_recovers_with_the_backlog(
    make_harness: Callable[..., Harness], new_page: Callable[..., Any]
) -> None:
    h = make_harness(offline_queue_max=3)
    page = await new_page()
    await signed_in(page, h, token("bao"))
    before = await publish(h, title="Before the restart")
    await page.wait_for_selector(f'[data-alert-id="{before["alert_id"]}"]')

    async def acked() -> bool:
        return int((await admin_stats(h))["acks"]) >= 1

    await eventually(acked, 20, "the page's ack")  # so that the queue holds the five only
    await h.stop_gateway(signal.SIGTERM)
    await page.wait_for_selector('#conn[data-state="reconnecting"]')
    assert "reconnecting" in (await page.inner_text("#conn")).lower()
    await screenshot(page, "page-reconnecting-desktop")
    missed = [await publish(h, title=f"While away {i}") for i in range(5)]
    await h.start_gateway()

    await page.wait_for_selector('#conn[data-state="open"]', timeout=60_000)
    for body in missed[-3:]:  # the cap keeps the newest three
        await page.wait_for_selector(f'[data-alert-id="{body["alert_id"]}"]')
    for body in missed[:2]:
        assert await page.query_selector(f'[data-alert-id="{body["alert_id"]}"]') is None
    banner = await page.wait_for_selector("#banner:not([hidden])")
    text = await banner.inner_text()
    assert "2 older alerts were skipped" in text, text
    assert "missed" in text, text
    assert await banner.get_attribute("data-kind") == "truncated"
    await screenshot(page, "page-backlog-desktop")
    await page.set_viewport_size(PHONE)
    await screenshot(page, "page-backlog-phone")
    # each alert once: the one before the restart was not shown twice
    count = await page.eval_on_selector_all(
        f'[data-alert-id="{before["alert_id"]}"]', "els => els.length"
    )
    assert count == 1


async def test_a_filter_change_takes_effect(harness: Harness, new_page: Callable[..., Any]) -> None:
    page = await new_page()
    await signed_in(page, harness, token("chidi"))
    await page.click("#controls summary")
    await page.fill("#group", "level:critical")
    await page.press("#group", "Enter")  # the keyboard works as well as the mouse
    await page.wait_for_selector('#sub-result[data-status="ok"]')
    assert "level:critical" in await page.inner_text("#groups")
    high = await publish(harness, alert_level="high", title="Only high")
    critical = await publish(harness, alert_level="critical", title="Critical")
    await page.wait_for_selector(f'[data-alert-id="{critical["alert_id"]}"]')
    # in publish order: had the high alert passed, it would be on the page already
    assert await page.query_selector(f'[data-alert-id="{high["alert_id"]}"]') is None

    await page.fill("#f-types", "flood")
    await page.click("#filter-form button[type=submit]")
    # (locators, not wait_for_function: the page's CSP forbids the eval it polls with)
    await page.locator("#sub-result", has_text="update_filters: done").wait_for()
    other = await publish(harness, alert_level="critical", alert_type="outbreak_risk")
    flood = await publish(harness, alert_level="emergency", alert_type="flood", title="Flood")
    await page.wait_for_selector(f'[data-alert-id="{flood["alert_id"]}"]')
    assert await page.query_selector(f'[data-alert-id="{other["alert_id"]}"]') is None

    await page.fill("#f-types", "Not A Type")  # the server says why; nothing changes
    await page.click("#filter-form button[type=submit]")
    await page.wait_for_selector('#sub-result[data-status="invalid"]')
    assert "alert_types" in await page.inner_text("#sub-result")
    assert await page.input_value("#f-types") == "flood", "the fields show what is stored"
    await page.click('button[aria-label="Unsubscribe level:critical"]')
    await page.wait_for_selector("#groups-none:not([hidden])")
    await screenshot(page, "page-filters-desktop")


async def test_a_refused_token_returns_to_the_sign_in_with_the_reason(
    harness: Harness, new_page: Callable[..., Any]
) -> None:
    page = await new_page()
    forged = token("mallory", secret="another-secret-0123456789abcdef-012345")
    await page.goto(f"{harness.gateway.http}/#token={forged}")
    # a browser cannot see a refused handshake's status; the client asks with a plain GET
    await page.wait_for_selector('#conn[data-state="failed"]')
    assert "invalid_signature" in await page.inner_text("#conn")
    assert await page.is_visible("#signin")


async def test_the_dashboard_moves_with_traffic(
    harness: Harness, new_page: Callable[..., Any]
) -> None:
    page = await new_page()
    await page.goto(
        f"{harness.gateway.http}/dashboard?interval=500#token={token('ops', roles=('analyst',))}"
    )
    await page.wait_for_selector('#conn[data-state="open"]')
    await page.wait_for_selector('#v-connections[data-value="0"]')
    device = await Client.connect(harness.gateway.ws_url, token("dede"), client_id="phone")
    try:
        await device.next("connection_established")
        await page.wait_for_selector('#v-connections[data-value="1"]')
        for i in range(20):
            await publish(harness, title=f"Traffic {i}")
        await device.alerts(20, ack=True)
        await page.wait_for_selector('#v-sent[data-value="20"]')

        # deliveries/s was above 0 in some interval, and latency percentiles are shown
        async def moved() -> bool:
            return float(await page.get_attribute("#v-rate", "data-max") or 0) > 0

        await eventually(moved, 20, "deliveries/s above 0")
        assert await page.eval_on_selector_all("#c-rate polyline", "l => l.length") == 1
        latency = await page.inner_text("#v-latency")
        assert "ms" in latency or " s" in latency, latency
        assert await page.eval_on_selector_all("#gateways tr", "rows => rows.length") == 1
        await screenshot(page, "dashboard-desktop")
        await page.set_viewport_size(PHONE)
        await screenshot(page, "dashboard-phone")
    finally:
        await device.close()
    await page.wait_for_selector('#v-connections[data-value="0"]')


async def test_the_dashboard_refuses_a_token_without_the_role(
    harness: Harness, new_page: Callable[..., Any]
) -> None:
    page = await new_page()
    await page.goto(f"{harness.gateway.http}/dashboard#token={token('eve')}")
    await page.wait_for_selector("#signin:not([hidden])")
    assert "forbidden" in await page.inner_text("#signin-error")
