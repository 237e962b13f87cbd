"""The browser side of the gateway: the alert page (``GET /``), the operator dashboard
(``GET /dashboard``), their static files, the dashboard's figures and, under ``tocsin run``
only, a development sign-in.

The pages are plain HTML, CSS and JavaScript in ``static/`` (package data: an installed
gateway serves them with no build step and nothing fetched from elsewhere). ``tocsin.js``
there is the JavaScript client of ``clients/js/`` (a symbolic link in the source tree,
copied as a file into a wheel). The files are read once, at start-up, and served from
memory with a strict Content-Security-Policy: scripts, styles and connections of this
origin only.

``POST /api/v1/dev/token`` mints a token for any user, roles and regions. It exists only
when ``TOCSIN_DEV_SIGN_IN`` is on (``tocsin run`` turns it on when it made the dev JWT
secret itself; the default is off), answers only requests from this machine (loopback
peers, not through a proxy) and needs the HS256 secret. docs/security.md says why it
must never be on in production.
"""

from __future__ import annotations

import ipaddress
import re
import time
from importlib import resources
from typing import Any

from aiohttp import web

from tocsin.core.auth import Role, mint_token
from tocsin.schemas import is_region

from .handler import GATEWAY, WS_PATH
from .registry import Histogram, iso_time
from .stats import Cached, authorize_reader, gather_gateways, json_body

#: The files of static/ that are served, and their media types. A fixed list: nothing
#: else of the package can be asked for by path.
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "tocsin.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGES = {"/": "index.html", "/dashboard": "dashboard.html"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: How long the dashboard waits for every gateway's stats over NATS, and reuses them.
GATEWAYS_WAIT_SECONDS = 0.3
GATEWAYS_CACHE_SECONDS = 1.0
#: The development sign-in's bounds.
DEV_TTL_DEFAULT = 8 * 3600
DEV_TTL_MAX = 7 * 24 * 3600
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

GATEWAYS: web.AppKey[Cached[dict[str, Any]]] = web.AppKey("gateways_stats", Cached)


def _load() -> dict[str, bytes]:
    root = resources.files("tocsin.gateway").joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name in STATIC}


def setup(app: web.Application) -> None:
    files = _load()  # a file missing from the package fails start-up, not a request

    def serve(name: str) -> Any:
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=files[name], headers={"Content-Type": STATIC[name], **HEADERS})

        return handler

    for path, name in PAGES.items():
        app.router.add_get(path, serve(name))
    for name in STATIC:
        app.router.add_get(f"/static/{name}", serve(name))
    app.router.add_get("/api/v1/web/config", config)
    app.router.add_post("/api/v1/dev/token", dev_token)
    app.router.add_get("/api/v1/dashboard", dashboard)

    async def gather() -> dict[str, Any]:
        gw = app[GATEWAY]
        return await gather_gateways(gw.nc, gw.names.gateways_stats_subject, GATEWAYS_WAIT_SECONDS)

    app[GATEWAYS] = Cached(gather, GATEWAYS_CACHE_SECONDS)


async def config(request: web.Request) -> web.Response:
    """What the pages need to know before signing in."""
    settings = request.app[GATEWAY].settings
    dev = bool(settings.dev_sign_in and settings.jwt_secret)
    return web.json_response({"ws_path": WS_PATH, "dev_sign_in": dev})


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


def _loopback(peer: str | None) -> bool:
    try:
        return peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


def _strings(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: a list of strings, or one comma-separated string")
    return value


async def dev_token(request: web.Request) -> web.Response:
    """``{"user": "alice", "regions": ["KE"], "roles": ["health_worker"], "ttl": 3600}``
    → ``{"token": "...", "exp": ...}``; 404 unless TOCSIN_DEV_SIGN_IN is on."""
    settings = request.app[GATEWAY].settings
    if not settings.dev_sign_in or not settings.jwt_secret:
        return _error(404, "not_found", "the development sign-in is off (TOCSIN_DEV_SIGN_IN)")
    forwarded = "Forwarded" in request.headers or "X-Forwarded-For" in request.headers
    if not _loopback(request.remote) or forwarded:  # a proxy's requests come from loopback
        return _error(403, "forbidden", "the development sign-in answers this machine only")
    try:
        body = await request.json()
    except ValueError:
        return _error(422, "invalid_json", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(422, "invalid_json", "the body must be a JSON object")
    try:
        user = body.get("user")
        if not isinstance(user, str) or not USER_RE.fullmatch(user):
            raise ValueError("user: 1-128 characters of A-Z a-z 0-9 . _ : @ -")
        regions = _strings(body, "regions")
        for code in regions:
            if not is_region(code):
                raise ValueError(f"regions: {code!r} is not a region code (e.g. KE or KE-30)")
        roles = _strings(body, "roles") or ["health_worker"]
        known = [r.value for r in Role]
        for role in roles:
            if role not in known:
                raise ValueError(f"roles: {role!r} is not one of {', '.join(known)}")
        ttl = body.get("ttl", DEV_TTL_DEFAULT)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= DEV_TTL_MAX:
            raise ValueError(f"ttl: seconds, more than 0 and at most {DEV_TTL_MAX}")
        if "admin" not in roles and not regions:
            raise ValueError("regions: give at least one (only admin receives every region)")
    except ValueError as exc:
        return _error(422, "invalid_request", str(exc))
    token = mint_token(
        settings.jwt_secret, user, roles=roles, regions=regions, ttl_seconds=float(ttl)
    )
    return web.json_response({"token": token, "exp": int(time.time() + float(ttl))})


def _histogram(h: Histogram) -> dict[str, Any]:
    return {"bounds": list(h.bounds), "counts": list(h.counts), "sum": h.sum}


async def dashboard(request: web.Request) -> web.Response:
    """This gateway's stats, its delivery-latency histograms (the dashboard computes
    percentiles from them, over its own polling interval), and every gateway's stats
    gathered over NATS (as ``tocsin status`` does)."""
    refused = await authorize_reader(request)
    if refused is not None:
        return refused
    gw = request.app[GATEWAY]
    try:
        gateways = await request.app[GATEWAYS].get()
    except Exception as exc:  # NATS away: this gateway's own figures still come
        gateways = {"error": f"{type(exc).__name__}: {exc}", "replies": []}
    timings = gw.sessions.timings
    return json_body(
        {
            "stats": await gw.stats.body(),
            "latency": {"live": _histogram(timings.live), "backlog": _histogram(timings.backlog)},
            "gateways": gateways,
            "generated_at": iso_time(time.time()),
        }
    )
