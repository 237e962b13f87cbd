"""Hostile clients for tests/chaos/test_hostile.py, run in a process of their own (so that
their floods cost the gateway, not the well-behaved clients' event loop):

    python -m tests.chaos.hostile WS_URL SECRET CLIENTS SECONDS [KIND,KIND...]

Each client is one of five kinds, by turns: ``garbage`` (text that is not JSON, as fast as
it can), ``flood`` (valid get_stats frames, as fast as it can), ``oversized`` (100 KB
frames, and once a 2 MB one), ``binary`` (binary frames), ``deaf`` (a 4 KiB receive buffer,
never reads, never answers). Each has a user of its own (``hostile-<i>``), so a ban hits
only it. It prints one JSON line: per kind, how its connections ended (close codes) and
how many were refused at the handshake (429) when they tried again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import time
from typing import Any

import aiohttp

from tocsin.bench.netem import small_window
from tocsin.core.auth import mint_token

KINDS = ("garbage", "flood", "oversized", "binary", "deaf")


async def one(
    url: str, secret: str, i: int, until: float, out: dict[str, Any], kinds: tuple[str, ...]
) -> None:
    kind = kinds[i % len(kinds)]
    tok = mint_token(secret, f"hostile-{i}", regions=["KE"])
    connector = aiohttp.TCPConnector(socket_factory=small_window(4096) if kind == "deaf" else None)
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.monotonic() < until:
            try:
                ws = await http.ws_connect(url, params={"auth_token": tok}, autoping=kind != "deaf")
            except aiohttp.WSServerHandshakeError as exc:
                out["refused"][kind][exc.status] += 1
                await asyncio.sleep(1.0)  # its own retry timer
                continue
            except aiohttp.ClientError:
                await asyncio.sleep(1.0)
                continue
            code = await attack(ws, kind, until)
            out["closed"][kind][code] += 1


async def attack(ws: aiohttp.ClientWebSocketResponse, kind: str, until: float) -> int:
    drain = None if kind == "deaf" else asyncio.create_task(_drain(ws))
    if kind == "deaf" and ws._conn is not None and ws._conn.transport is not None:
        ws._conn.transport.pause_reading()
    try:
        n = 0
        while not ws.closed and time.monotonic() < until:
            n += 1
            if kind == "garbage":
                await ws.send_str("{not json" * 10)
            elif kind == "flood":
                await ws.send_str('{"type":"get_stats"}')
            elif kind == "oversized":
                await ws.send_str("x" * (2_000_000 if n == 20 else 100_000))
            elif kind == "binary":
                await ws.send_bytes(b"\x00" * 100)
            else:  # deaf: sends nothing either, once connected
                await asyncio.sleep(0.2)
                continue
            if n % 20 == 0:
                await asyncio.sleep(0)  # let the close be read
    except (ConnectionError, RuntimeError, aiohttp.ClientError):
        pass
    finally:
        if drain is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(drain, 5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 2)
    return ws.close_code or 1006


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def main(
    url: str, secret: str, clients: int, seconds: float, kinds: tuple[str, ...] = KINDS
) -> dict[str, Any]:
    until = time.monotonic() + seconds
    out: dict[str, Any] = {
        "closed": {k: collections.Counter() for k in KINDS},
        "refused": {k: collections.Counter() for k in KINDS},
    }
    await asyncio.gather(*(one(url, secret, i, until, out, kinds) for i in range(clients)))
    return out


if __name__ == "__main__":
    url, secret, n, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    kinds = tuple(sys.argv[5].split(",")) if len(sys.argv) > 5 else KINDS
    result = asyncio.run(main(url, secret, n, secs, kinds))
    print(json.dumps({part: {k: dict(c) for k, c in v.items()} for part, v in result.items()}))
