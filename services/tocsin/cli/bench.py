"""``tocsin bench``: the table run (the command; the run itself is tocsin.bench.run)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
from dataclasses import asdict
from pathlib import Path

from tocsin.bench.run import PLANS, Plan, run_bench

from .common import Fail


def cmd_bench(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("matplotlib") is None:  # checked before a minutes-long run
        raise Fail(
            "tocsin bench draws its plots with matplotlib, which is not installed: "
            "pip install 'tocsin[bench]' (in a source tree: pip install -e '.[bench]')",
            2,
        )
    plan_name = "full" if args.full else "quick"
    plan = PLANS[plan_name]
    for flag, key, least in (
        ("--connections", "connections", 2),
        ("--devices", "devices", 1),
        ("--targeted", "targeted", 1),
        ("--hold", "hold_seconds", 0),
    ):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            if value < least:
                raise Fail(f"{flag}: at least {least}, got {value}", 2)
            plan = Plan(**(asdict(plan) | {key: value}))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d-%H%M")
    name = f"bench-{plan_name}-{stamp}" + (f"-{args.only}" if args.only else "")
    env = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("TOCSIN_"):
            raise Fail(f"--set: expected TOCSIN_NAME=value, got {item!r}", 2)
        env[key] = value
    if args.gateway_code is not None:
        code = args.gateway_code.resolve()
        if not (code / "tocsin" / "__init__.py").is_file():
            raise Fail(f"--gateway-code: no tocsin package in {code}", 2)
        env["PYTHONPATH"] = str(code)
    report = asyncio.run(
        run_bench(plan, name, Path(args.out), profile=args.profile, gateway_env=env, only=args.only)
    )
    print(report["table"])
    print(f"\nwritten: {Path(args.out) / name}.md, .json, plots: {', '.join(report['plots'])}")
    return 0
