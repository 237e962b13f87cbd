"""``tocsin gateway`` and ``tocsin ingest``: one service each, in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

from tocsin.core.logs import setup_logging
from tocsin.core.settings import Settings, exit_on_bad_settings
from tocsin.core.supervisor import raise_fd_limit

from .common import Fail

# Not __name__: the log lines have always said "tocsin.cli".
log = logging.getLogger("tocsin.cli")


def _require_nats(settings: Settings, what: str) -> None:
    if not settings.nats_url:
        raise Fail(
            f"TOCSIN_NATS_URL is not set: `tocsin {what}` needs a NATS server "
            "(e.g. nats://127.0.0.1:4222); `tocsin run` sets it for its children",
            2,
        )


def use_event_loop(settings: Settings) -> str:
    """Install the gateway's event loop policy (``TOCSIN_EVENT_LOOP``); its name. uvloop
    took about 30% off the gateway's CPU per delivery in ``tocsin bench peers`` (2,000
    devices, docs/benchmarks.md)."""
    if settings.event_loop == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if settings.event_loop == "uvloop":
            raise Fail("TOCSIN_EVENT_LOOP=uvloop: uvloop is not installed", 2) from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def cmd_gateway(args: argparse.Namespace) -> int:
    from aiohttp import web

    settings = exit_on_bad_settings()
    _require_nats(settings, "gateway")
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwt_jwks_url):
        raise Fail(
            "TOCSIN_JWT_SECRET (or TOCSIN_JWT_PUBLIC_KEY, or TOCSIN_JWT_JWKS_URL) is not set: "
            "the gateway cannot verify tokens without a key",
            2,
        )
    setup_logging(settings, service="gateway")
    loop = use_event_loop(settings)
    from tocsin.gateway.app import create_app

    fd_limit = raise_fd_limit()  # a socket per device: the soft limit (often 1024) is low
    own = _own_socket(settings)
    app = create_app(settings)
    shared = settings.gateways > 1
    log.info(
        "gateway listening on http://%s:%s%s%s (NATS %s; %s event loop; %d open files)",
        settings.http_host,
        settings.http_port,
        f", shared by {settings.gateways} gateway processes (SO_REUSEPORT)" if shared else "",
        f", its own on :{settings.gateway_metrics_port}" if own is not None else "",
        ",".join(settings.nats_url),
        loop,
        fd_limit,
    )
    # run_app turns SIGINT/SIGTERM into a graceful stop: on_shutdown closes the sockets
    # (1001), cleanup saves positions and drains NATS.
    web.run_app(
        app,
        host=settings.http_host,
        port=settings.http_port,
        shutdown_timeout=settings.shutdown_grace_seconds,
        print=None,
        access_log=log if settings.log_level == "DEBUG" else None,
        handle_signals=True,
        # One of several processes on the port (`tocsin run` with TOCSIN_GATEWAYS > 1): the
        # kernel spreads the connections over them. Alone, the port stays exclusive: a
        # second gateway started on it by mistake fails at once instead of silently taking
        # a share of the connections.
        reuse_port=shared or None,
        sock=[own] if own is not None else None,
        # aiohttp arms this at connect too: a client that has not sent a whole request by
        # then (a slow-loris upgrade) is closed (docs/security.md)
        keepalive_timeout=settings.handshake_timeout_seconds,
    )
    return 0


def _own_socket(settings: Settings) -> socket.socket | None:
    """The listening socket of TOCSIN_GATEWAY_METRICS_PORT (the gateway's own address, the
    whole app answered by this process alone), or None when it is 0."""
    if not settings.gateway_metrics_port:
        return None
    host, port = settings.http_host, settings.gateway_metrics_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise Fail(
            f"TOCSIN_GATEWAY_METRICS_PORT {port} on {host}: {exc.strerror or exc}; "
            "set it to a free port (or 0: none)",
            2,
        ) from None
    return sock


def cmd_ingest(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    _require_nats(settings, "ingest")
    # Imported first: faststream puts handlers of its own on its loggers at import, and
    # setup_logging takes them off.
    from tocsin.ingest.app import create_app

    setup_logging(settings, service="ingest")
    app = create_app(settings, list(settings.nats_url))
    log.info("ingest consuming from NATS %s", ",".join(settings.nats_url))
    # FastStream.run installs SIGINT/SIGTERM handlers that stop the app cleanly. Its
    # log_level is the level its start/stop lines are logged *at* (faststream
    # _internal/application.py _startup_logging), not a threshold: left at INFO, or
    # TOCSIN_LOG_LEVEL=ERROR would turn "FastStream app starting..." into an ERROR.
    asyncio.run(app.run())
    return 0


def cmd_notifier(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    _require_nats(settings, "notifier")
    if not settings.push_url:
        raise Fail("TOCSIN_PUSH_URL is not set: the notifier has nowhere to push to", 2)
    from tocsin.notifier.app import create_app  # before setup_logging, as for ingest

    setup_logging(settings, service="notifier")
    app = create_app(settings, list(settings.nats_url))
    log.info("notifier pushing to %s (NATS %s)", settings.push_url, ",".join(settings.nats_url))
    asyncio.run(app.run())
    return 0
