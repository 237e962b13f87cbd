#!/usr/bin/env python3
"""Container health checks for the tocsin image (compose.yaml), exit 0 = healthy.

    tocsin-healthcheck URL      GET URL answers 200 (the gateway's /readyz: NATS connected,
                                streams present, live feed running, not shutting down)
    tocsin-healthcheck ingest [SECONDS]
                                the ingest durable has a pull request waiting (someone is
                                consuming ``ingest.alerts``) or alerts in hand, sampled for
                                SECONDS (default 3); reads TOCSIN_NATS_URL, TOCSIN_NAMESPACE

The ingest service has no HTTP listener; what proves it works is that it pulls from its
durable. With more than one ingest replica this says "some ingest is pulling".
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.error
import urllib.request

WINDOW_SECONDS = 3.0
SAMPLE_GAP = 0.25


def http_ok(url: str) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def ingest_pulling(window: float) -> bool:
    import nats

    from tocsin.core.naming import Names
    from tocsin.core.settings import load_settings

    settings = load_settings()
    names = Names(settings.namespace)
    nc = await nats.connect(settings.nats_url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=2)
        deadline = time.monotonic() + window
        while True:
            info = await js.consumer_info(names.ingest_stream, names.ingest_consumer)
            if (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(SAMPLE_GAP)
    finally:
        await nc.close()


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2 or (len(argv) == 2 and argv[0] != "ingest"):
        print("usage: tocsin-healthcheck URL | ingest [SECONDS]", file=sys.stderr)
        return 2
    target = argv[0]
    if target == "ingest":
        try:
            window = float(argv[1]) if len(argv) == 2 else WINDOW_SECONDS
            ok = asyncio.run(ingest_pulling(window))
        except Exception as exc:  # no NATS, no durable yet: unhealthy, and say why
            print(f"ingest unhealthy: {exc!r}", file=sys.stderr)
            return 1
    else:
        ok = http_ok(target)
    if not ok:
        print(f"{target}: unhealthy", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
