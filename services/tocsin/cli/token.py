"""``tocsin token``: print an HS256 token minted with the JWT secret."""

from __future__ import annotations

import argparse

from tocsin.core.settings import exit_on_bad_settings

from .common import Fail, mint, roles_and_regions


def cmd_token(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    roles, regions = roles_and_regions(args)
    if args.ttl <= 0:
        raise Fail("--ttl must be a positive number of seconds", 2)
    print(mint(settings, args.user, roles, regions, args.ttl), flush=True)
    return 0
