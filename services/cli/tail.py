"""``tocsin tail``: connect as one device and print every frame it receives."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from tocsin.core.settings import Settings, exit_on_bad_settings

from .common import NOT_RUNNING_HINT, Fail, mint, roles_and_regions, ws_url

#: Lifetime of the token ``tocsin tail`` mints for itself (an expired token closes the socket).
TAIL_TOKEN_TTL = 24 * 3600


def format_frame(frame: dict[str, Any]) -> str:
    if frame.get("type") == "alert" and isinstance(frame.get("alert"), dict):
        alert = frame["alert"]
        region = (alert.get("location") or {}).get("region", "?")
        line = (
            f"alert seq={frame.get('seq')} level={alert.get('alert_level')} "
            f"region={region} type={alert.get('alert_type')} id={alert.get('alert_id')} "
            f"title={json.dumps(alert.get('title'), ensure_ascii=False)}"
        )
        return line + (" (redelivered)" if frame.get("redelivered") else "")
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    import aiohttp

    if args.token:
        token = args.token
    else:
        if not args.user or not args.regions:
            raise Fail("--user and --regions are needed to mint a token (or pass --token)", 2)
        roles, regions = roles_and_regions(args)
        token = mint(settings, args.user, roles, regions, TAIL_TOKEN_TTL)
    url = args.url or ws_url(settings)
    params = {"auth_token": token, "client_id": args.client_id, "ack_mode": args.ack_mode}
    seen = 0
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, params=params, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            # The refusal's JSON body is not kept by aiohttp: ask again without the upgrade
            # (the handshake checks run before the upgrade, so the answer is the same).
            body = ""
            try:
                async with session.get(url, params=params) as resp:
                    if resp.status == exc.status:
                        body = (await resp.text()).strip()
            except aiohttp.ClientError:
                pass
            if body:
                print(body, flush=True)
            print(
                f"tocsin: {url} refused the WebSocket with HTTP {exc.status}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        except (aiohttp.ClientError, OSError) as exc:
            raise Fail(f"cannot connect to {url}: {exc} {NOT_RUNNING_HINT}") from None
        async with ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                except json.JSONDecodeError:
                    print(f"(not JSON) {msg.data}", flush=True)
                    continue
                print(format_frame(frame), flush=True)
                kind = frame.get("type")
                if kind == "ping":
                    await ws.send_str(json.dumps({"type": "pong", "ts": frame.get("ts")}))
                elif kind == "alert":
                    if args.ack_mode == "client" and isinstance(frame.get("seq"), int):
                        await ws.send_str(json.dumps({"type": "ack", "seq": frame["seq"]}))
                    seen += 1
                    if args.count and seen >= args.count:
                        await ws.close()
                        return 0
            code = ws.close_code
    print(f"tocsin: connection closed by the server (code {code})", file=sys.stderr, flush=True)
    return 0 if code == 1000 and not args.count else 1


def cmd_tail(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    if args.count is not None and args.count < 1:
        raise Fail("--count must be 1 or more", 2)
    return asyncio.run(_tail(settings, args))
