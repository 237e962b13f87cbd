"""Alerts over HTTP: one by id (JSON or CAP 1.2), and an Atom index of current alerts.

* ``GET /api/v1/alerts/{alert_id}``: the stored alert (CONTRACT §5). JSON by default; CAP 1.2
  XML with ``Accept: application/cap+xml``. Found through the ``ALERT_INDEX`` stream (two
  direct gets, core/alert_index.py). 404 when unknown or aged out.
* ``GET /api/v1/alerts/feed``: Atom 1.0, newest first, of the alerts in the retention that
  are neither expired nor superseded (a cancel is listed: it tells CAP consumers what is
  withdrawn), each entry linking to its CAP document. At most :data:`FEED_ENTRIES`,
  looked for among the newest :data:`FEED_SCAN` alerts; the scan is shared for
  :data:`FEED_CACHE_SECONDS`.

Both need a token (``Authorization: Bearer`` or ``?auth_token=``): an alert is shown to a
token whose regions include its region, or with role admin, analyst or publisher; the feed
lists what the token may see. Held CAP messages (status not Actual) only to those roles.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from xml.etree.ElementTree import Element, SubElement, tostring

from aiohttp import web
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from tocsin.cap import CAP_MEDIA_TYPE, CapMeta, CapRules, to_cap
from tocsin.core.alert_index import lookup
from tocsin.core.auth import Claims, Role, TokenError, bearer
from tocsin.core.naming import CAP_HEADER, EXPIRES_HEADER, MSG_ID_HEADER
from tocsin.schemas import Alert
from tocsin.schemas.alert import ALERT_ID_STR_PATTERN, region_contains

if TYPE_CHECKING:
    from .context import Gateway

ATOM_NS = "http://www.w3.org/2005/Atom"
ATOM_MEDIA_TYPE = "application/atom+xml"
FEED_ENTRIES = 100
FEED_SCAN = 2000
FEED_CACHE_SECONDS = 2.0
#: Roles that read every alert, held ones included.
READERS = frozenset({Role.ADMIN, Role.ANALYST, Role.PUBLISHER})
_ID_RE = re.compile(ALERT_ID_STR_PATTERN)


def _error(status: int, error: str, detail: str) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


async def _claims(request: web.Request, gw: Gateway) -> Claims | web.Response:
    token = bearer(request.headers.get("Authorization")) or request.query.get("auth_token")
    try:
        return await gw.verifier.averify(token)
    except TokenError as exc:
        return _error(401, exc.error, exc.detail)


def may_read(claims: Claims, region: str) -> bool:
    if READERS.intersection(claims.roles):
        return True
    regions = claims.receivable_regions()
    return regions is None or any(region_contains(r, region) for r in regions)


def wants_cap(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return CAP_MEDIA_TYPE in accept or "application/xml" in accept


async def _references(gw: Gateway, alert: Alert) -> tuple[str, ...]:
    """The CAP triples of what ``alert`` references, when each is known and came as CAP."""
    triples = []
    for ref in alert.referenced_ids:
        found = await lookup(gw.js, gw.names, ref)
        meta = CapMeta.from_header(found.headers.get(CAP_HEADER)) if found else None
        if meta is None:
            return ()
        triples.append(f"{meta.sender},{meta.identifier},{meta.sent}")
    return tuple(triples)


def alerts_routes(app: web.Application, rules: CapRules) -> None:
    from .handler import GATEWAY

    feed_cache: dict[str, tuple[float, list[Scanned]]] = {}
    feed_lock = asyncio.Lock()

    async def one(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        claims = await _claims(request, gw)
        if isinstance(claims, web.Response):
            return claims
        alert_id = request.match_info["alert_id"]
        if not _ID_RE.fullmatch(alert_id):
            return _error(404, "not_found", f"alert_id: {alert_id!r} is not an alert id")
        found = await lookup(gw.js, gw.names, alert_id)
        if found is None or (found.held and not READERS.intersection(claims.roles)):
            return _error(404, "not_found", f"alert_id: no alert {alert_id!r} is stored")
        alert = Alert.model_validate_json(found.data)
        if not may_read(claims, alert.location.region):
            return _error(403, "forbidden", "regions: the token may not read this alert's region")
        headers = {}
        if found.superseded_by is not None:
            headers["Tocsin-Superseded-By"] = found.superseded_by
        if wants_cap(request):
            meta = CapMeta.from_header(found.headers.get(CAP_HEADER))
            refs = await _references(gw, alert) if alert.references else ()
            body = to_cap(alert, meta, rules, refs, found.stored_at)
            return web.Response(body=body, content_type=CAP_MEDIA_TYPE, headers=headers)
        return web.Response(body=found.data, content_type="application/json", headers=headers)

    async def feed(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        claims = await _claims(request, gw)
        if isinstance(claims, web.Response):
            return claims
        async with feed_lock:
            cached = feed_cache.get("scan")
            if cached is None or time.monotonic() - cached[0] > FEED_CACHE_SECONDS:
                cached = (time.monotonic(), await _scan(gw))
                feed_cache["scan"] = cached
        now = time.time()
        entries = [
            s
            for s in cached[1]
            if not (s.expires is not None and s.expires <= now)
            and not gw.supersessions.is_superseded(s.msg_id, s.seq)
            and may_read(claims, gw.names.parse_alert_subject(s.subject)[0])
        ][:FEED_ENTRIES]
        body = atom(entries, rules, request.url.with_query(None).human_repr(), now)
        return web.Response(body=body, content_type=ATOM_MEDIA_TYPE)

    app.router.add_get("/api/v1/alerts/feed", feed)
    app.router.add_get("/api/v1/alerts/{alert_id}", one)


@dataclass(frozen=True)
class Scanned:
    seq: int
    subject: str
    msg_id: str
    data: bytes
    expires: float | None
    stored: datetime


async def _scan(gw: Gateway) -> list[Scanned]:
    """The newest FEED_SCAN alerts of ``ALERTS``, newest first: one ephemeral consumer
    (in memory, no acks), read to the stream's end."""
    js, names = gw.js, gw.names
    info = await js.stream_info(names.alerts_stream)
    last, first = info.state.last_seq, info.state.first_seq
    if not info.state.messages:
        return []
    start = max(first, last - FEED_SCAN + 1)
    sub = await js.pull_subscribe(
        names.alerts_all,
        stream=names.alerts_stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=10.0,
            num_replicas=1,
        ),
    )
    out: list[Scanned] = []
    try:
        seen = start - 1
        while seen < last:
            try:
                msgs = await sub.fetch(min(256, last - seen), timeout=2.0)
            except TimeoutError:
                break
            for msg in msgs:
                meta = msg.metadata
                seen = meta.sequence.stream
                headers = msg.headers or {}
                expires = headers.get(EXPIRES_HEADER)
                out.append(
                    Scanned(
                        seen,
                        msg.subject,
                        headers.get(MSG_ID_HEADER, ""),
                        msg.data,
                        float(expires) if expires else None,
                        meta.timestamp,
                    )
                )
            if not msgs or meta.num_pending == 0:
                break
    finally:
        await sub.unsubscribe()
    out.reverse()
    return out


def _atom_time(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def atom(entries: list[Scanned], rules: CapRules, self_url: str, now: float) -> bytes:
    """An Atom 1.0 feed; each entry's ``alternate`` link is the alert's CAP document."""
    # Plain tags under a literal xmlns: ElementTree's default_namespace refuses the
    # unqualified attributes Atom uses (rel, href).
    root = Element("feed", xmlns=ATOM_NS)

    def add(parent: Element, name: str, text: str | None = None, **attrs: str) -> Element:
        node = SubElement(parent, name, attrs)
        if text is not None:
            node.text = text
        return node

    base = self_url.rsplit("/feed", 1)[0]
    add(root, "id", f"{self_url}")
    add(root, "title", "tocsin: current alerts")
    newest = entries[0].stored if entries else datetime.fromtimestamp(now, UTC)
    add(root, "updated", _atom_time(newest))
    add(root, "link", rel="self", href=self_url, type=ATOM_MEDIA_TYPE)
    author = add(root, "author")
    add(author, "name", rules.sender)
    for scanned in entries:
        try:
            alert = Alert.model_validate_json(scanned.data)
        except ValueError:
            continue
        entry = add(root, "entry")
        url = f"{base}/{alert.alert_id}"
        add(entry, "id", url)
        add(entry, "title", alert.title)
        add(entry, "updated", _atom_time(scanned.stored))
        add(entry, "summary", alert.message[:1000])
        add(entry, "link", rel="alternate", href=url, type=CAP_MEDIA_TYPE)
        add(entry, "category", term=alert.alert_level.value, label="alert_level")
        add(entry, "category", term=alert.msg_type.value, label="msg_type")
        add(entry, "category", term=alert.location.region, label="region")
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + tostring(root, encoding="unicode").encode()
