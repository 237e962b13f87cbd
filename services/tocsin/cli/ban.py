"""``tocsin ban list|add|lift``: the bans every gateway enforces (gateway/guard.py).

A ban closes the user's open sockets with 1008 on every instance and refuses its
handshakes with 429 ``banned`` until it ends (by itself, or lifted here). Each change is
also logged as an audit line by the gateways that see it.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import time

from tocsin.core.naming import Names
from tocsin.core.settings import Settings, exit_on_bad_settings
from tocsin.gateway.guard import add_ban, guard_bucket, lift_ban, list_bans

from .common import Fail, connect_once, nats_urls


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _ban(settings: Settings, args: argparse.Namespace) -> int:
    nc = await connect_once(nats_urls(settings), settings)
    try:
        js = nc.jetstream()
        names = Names(settings.namespace)
        kv = await guard_bucket(js, settings, names)
        if args.action == "add":
            minutes = args.minutes or settings.ban_duration_minutes
            by = f"operator {getpass.getuser()}"
            ban = await add_ban(js, names, args.sub, minutes * 60, args.reason, by)
            print(f"banned {ban.sub!r} until {_iso(ban.until)} ({args.reason})")
        elif args.action == "lift":
            if not await lift_ban(kv, args.sub):
                raise Fail(f"{args.sub!r} is not banned", 1)
            print(f"lifted the ban of {args.sub!r}")
        else:
            bans = await list_bans(js, kv, names)
            if args.json:
                print(json.dumps([b.as_dict() | {"remaining_s": round(b.remaining)} for b in bans]))
            elif not bans:
                print("no bans")
            else:
                for b in bans:
                    print(f"{b.sub!r}  until {_iso(b.until)}  ({b.reason}; by {b.by})")
    finally:
        await nc.close()
    return 0


def cmd_ban(args: argparse.Namespace) -> int:
    if args.action in ("add", "lift") and not args.sub:
        raise Fail(f"tocsin ban {args.action} needs the user's sub", 2)
    if args.minutes is not None and not 0 < args.minutes <= 7 * 24 * 60:
        raise Fail("--minutes must be more than 0 and at most a week (10080)", 2)
    settings = exit_on_bad_settings()
    if not settings.nats_url:
        raise Fail(
            "TOCSIN_NATS_URL is not set: bans live in JetStream "
            f"(e.g. TOCSIN_NATS_URL=nats://127.0.0.1:{settings.nats_port})",
            2,
        )
    return asyncio.run(_ban(settings, args))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ban",
        help="list, add or lift the bans every gateway enforces",
        description="Bans are kept in JetStream (the GUARD bucket) and end by themselves; "
        "every gateway closes a banned user's sockets (1008) and refuses its handshakes "
        "(429 banned) until then.",
    )
    p.add_argument("action", choices=["list", "add", "lift"])
    p.add_argument("sub", nargs="?", help="the user (the token's sub)")
    p.add_argument("--minutes", type=float, help="how long (default: TOCSIN_BAN_DURATION_MINUTES)")
    p.add_argument("--reason", default="banned by an operator", help="shown to operators")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p.set_defaults(func=cmd_ban)
