"""Hostile XML is refused before anything is expanded, read or fetched: XXE at a local file
and at a local HTTP server (which must see no request), billion laughs, external DTDs,
deep nesting, and a 50 MB body; in the parser, over HTTP (422/413) and over NATS (DLQ)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from tocsin.cap import CapError, parse_cap
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.ingest.pipeline import Reason, Rejection, validate_cap

from ..ingest.test_ingest_service import Ingest
from ..support import DEADLINE, RunningGateway, eventually, token
from .test_mapping import ACCEPTED, RULES, fixture

SECRET_TEXT = "tocsin-secret-7f3a"


class Tripwire:
    """A local HTTP server that counts every request: an XXE or DTD fetch would hit it."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        return web.Response(text=SECRET_TEXT)


@pytest.fixture
async def tripwire() -> AsyncIterator[Tripwire]:
    wire = Tripwire()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", wire.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    wire.url = f"http://127.0.0.1:{port}"
    yield wire
    await runner.cleanup()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.txt"
    path.write_text(SECRET_TEXT)
    return path


def in_headline(prolog: str, headline: str) -> bytes:
    """The amber fixture with ``prolog`` before its root and ``headline`` as the headline."""
    body = fixture("amber.xml").split(b"?>", 1)[1].decode()
    body = body.replace("Amber Alert in Los Angeles County", headline)
    return f'<?xml version="1.0"?>\n{prolog}\n{body}'.encode()


def hostile(secret: Path, wire: Tripwire) -> dict[str, bytes]:
    laughs = '<!ENTITY lol "lol">' + "".join(
        f'<!ENTITY lol{i} "{("&lol%s;" % ("" if i == 1 else i - 1)) * 10}">' for i in range(1, 10)
    )
    return {
        "xxe-file": in_headline(f'<!DOCTYPE alert [<!ENTITY x SYSTEM "file://{secret}">]>', "&x;"),
        "xxe-http": in_headline(f'<!DOCTYPE alert [<!ENTITY x SYSTEM "{wire.url}/xxe">]>', "&x;"),
        "external-dtd": in_headline(f'<!DOCTYPE alert SYSTEM "{wire.url}/dtd">', "x"),
        "parameter-entity": in_headline(
            f'<!DOCTYPE alert [<!ENTITY % p SYSTEM "{wire.url}/pe"> %p;]>', "x"
        ),
        "billion-laughs": in_headline(f"<!DOCTYPE alert [{laughs}]>", "&lol9;"),
        "internal-entity": in_headline('<!DOCTYPE alert [<!ENTITY e "x">]>', "&e;"),
        "deep": b'<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">'
        + b"<a>" * 5000
        + b"</a>" * 5000
        + b"</alert>",
    }


CASES = ["xxe-file", "xxe-http", "external-dtd", "parameter-entity", "billion-laughs",
         "internal-entity", "deep"]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_parser_refuses_hostile_xml_reading_nothing(
    case: str, secret_file: Path, tripwire: Tripwire
) -> None:
    raw = hostile(secret_file, tripwire)[case]
    with pytest.raises(CapError) as err:
        parse_cap(raw)
    assert SECRET_TEXT not in str(err.value)
    expected = "nests deeper" if case == "deep" else "refused XML"
    assert expected in str(err.value)
    assert tripwire.hits == []


def test_fifty_megabytes_are_refused_unparsed() -> None:
    raw = fixture("amber.xml").replace(b"<note>", b"") + b" " * (50 * 1024 * 1024)
    started = time.monotonic()
    result = validate_cap(raw, ACCEPTED, RULES)
    assert isinstance(result, Rejection) and result.reason is Reason.TOO_LARGE
    assert "limit" in result.detail
    assert time.monotonic() - started < DEADLINE  # bounds a hang only


# --- over HTTP and NATS -------------------------------------------------------------------
@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(alert_types=["public_safety"], cap_alert_types=["Rescue=public_safety"])


async def post_cap(gateway: RunningGateway, raw: bytes) -> tuple[int, dict[str, object]]:
    headers = {
        "Content-Type": "application/cap+xml",
        "Authorization": f"Bearer {token('engine', ('US',), roles=('publisher',))}",
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as http,
        http.post(f"{gateway.http}/api/v1/alerts", data=raw, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


@pytest.mark.parametrize("case", ["xxe-file", "xxe-http", "external-dtd", "billion-laughs"])
async def test_http_answers_hostile_xml_422_reading_nothing(
    case: str,
    gateway: RunningGateway,
    js: JetStreamContext,
    names: Names,
    secret_file: Path,
    tripwire: Tripwire,
) -> None:
    status, body = await post_cap(gateway, hostile(secret_file, tripwire)[case])
    assert status == 422, body
    assert body["error"] == "invalid_cap" and "refused XML" in str(body["detail"])
    assert SECRET_TEXT not in str(body)
    assert tripwire.hits == []
    assert (await js.stream_info(names.alerts_stream)).state.messages == 0


async def test_http_refuses_fifty_megabytes_with_413(gateway: RunningGateway) -> None:
    status, body = await post_cap(gateway, b"<" + b" " * (50 * 1024 * 1024))
    assert status == 413, body
    assert body["error"] == "too_large"


async def test_nats_dead_letters_hostile_xml_reading_nothing(
    settings: Settings,
    nc: NatsClient,
    js: JetStreamContext,
    names: Names,
    secret_file: Path,
    tripwire: Tripwire,
) -> None:
    service = Ingest(settings)
    await service.start()
    try:
        cases = hostile(secret_file, tripwire)
        sent = [cases[c] for c in ("xxe-file", "xxe-http", "external-dtd", "billion-laughs")]
        for raw in sent:
            await nc.publish(names.ingest_subject, raw)

        async def all_dead() -> bool:
            return (await js.stream_info(names.dlq_stream)).state.messages == len(sent)

        await eventually(all_dead, what="every hostile event in the DLQ")
        kept = []
        for seq in range(1, len(sent) + 1):
            dead = await js.get_msg(names.dlq_stream, seq)
            assert (dead.headers or {})["Tocsin-Reason"] == "invalid_cap"
            assert "refused XML" in (dead.headers or {})["Tocsin-Errors"]
            kept.append(dead.data or b"")
        assert sorted(kept) == sorted(sent)  # kept as sent
        assert tripwire.hits == []
        assert (await js.stream_info(names.alerts_stream)).state.messages == 0
    finally:
        await service.stop()
