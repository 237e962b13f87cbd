"""The gateway's composition root: ``create_app(settings)`` wires everything, once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import nats
from aiohttp import web

from tocsin.cap import CapRules
from tocsin.core.auth import TokenVerifier
from tocsin.core.naming import Names
from tocsin.core.natsauth import connect_options
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology, topology_ready
from tocsin.ingest.http import publish_handler
from tocsin.ingest.metrics import IngestCounters
from tocsin.schemas import Close

from . import metrics, push
from . import web as pages
from .alerts_http import alerts_routes
from .context import Gateway
from .handler import GATEWAY, WS_PATH, websocket
from .metrics import PUBLISHED
from .stats import stats_handler

log = logging.getLogger(__name__)

#: Sockets closed at once during shutdown, so that closing 10,000 doesn't stall the loop.
CLOSE_BATCH = 500


def create_app(settings: Settings) -> web.Application:
    if not settings.nats_url:
        raise ValueError("TOCSIN_NATS_URL is required for the gateway")
    if not (settings.jwt_secret or settings.jwt_public_key):
        raise ValueError("TOCSIN_JWT_SECRET or TOCSIN_JWT_PUBLIC_KEY is required")
    app = web.Application(client_max_size=1024 * 1024)
    app[PUBLISHED] = IngestCounters()  # POST /api/v1/alerts, exposed by /metrics
    names = Names(settings.namespace)

    async def nats_and_gateway(app: web.Application) -> AsyncIterator[None]:
        holder: list[Gateway] = []  # the callbacks exist before the gateway does

        async def disconnected() -> None:
            if holder:
                await holder[0].on_disconnected()

        async def reconnected() -> None:
            if holder:
                await holder[0].on_reconnected()

        nc = await nats.connect(
            settings.nats_url,
            name="tocsin-gateway",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            drain_timeout=5,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            **connect_options(settings),  # a .creds file, its own inbox prefix
        )
        js = nc.jetstream()
        await apply_topology(js, settings, names)
        gw = Gateway(settings, nc, js)
        holder.append(gw)
        await gw.start()
        app[GATEWAY] = gw
        log.info(
            "gateway %s ready on NATS %s",
            gw.instance,
            # host and port only: the netloc holds the user and password (TOCSIN_NATS_URL)
            f"{nc.connected_url.hostname}:{nc.connected_url.port}" if nc.connected_url else "?",
        )
        try:
            yield
        finally:
            await gw.stop()
            with contextlib.suppress(Exception):
                await nc.drain()

    app.cleanup_ctx.append(nats_and_gateway)
    app.on_shutdown.append(_close_sockets)

    def js() -> nats.js.JetStreamContext:
        return app[GATEWAY].js

    app.router.add_get(WS_PATH, websocket)
    app.router.add_post(
        "/api/v1/alerts",
        publish_handler(
            TokenVerifier.from_settings(settings),
            names,
            settings.accepted_alert_types,
            js,
            app[PUBLISHED],
            CapRules.from_settings(settings),
        ),  # type: ignore[arg-type]
    )
    app.router.add_get("/api/v1/alerts/stats", stats_handler)
    alerts_routes(app, CapRules.from_settings(settings))  # after the fixed /api/v1/alerts/*
    app.router.add_get("/healthz", healthz)
    push.setup(app)  # PUT / DELETE /api/v1/devices/{client_id}/push
    app.router.add_get("/readyz", readyz)
    metrics.setup(app)  # GET /metrics; counts sessions once the gateway exists
    pages.setup(app)  # GET / and /dashboard, their files, the dev sign-in (web.py)
    return app


async def _close_sockets(app: web.Application) -> None:
    """SIGTERM: refuse new sockets, close open ones with 1001 after saving their positions."""
    gw = app[GATEWAY]
    gw.shutting_down = True
    sessions = list(gw.sessions)
    for i in range(0, len(sessions), CLOSE_BATCH):
        for session in sessions[i : i + CLOSE_BATCH]:
            session.close(Close.GOING_AWAY, "server shutting down")
        await asyncio.sleep(0)
    deadline = asyncio.get_running_loop().time() + gw.settings.shutdown_grace_seconds
    while gw.sessions and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if gw.sessions:
        log.warning("%d sessions still open after the grace period", len(gw.sessions))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    checks = {
        "nats_connected": gw.nc.is_connected,
        "streams_present": gw.nc.is_connected and await topology_ready(gw.js, gw.names),
        "live_feed": gw.background_tasks_running,
        "accepting": not gw.shutting_down,
    }
    ready = all(checks.values())
    return web.json_response({"ready": ready, **checks}, status=200 if ready else 503)
