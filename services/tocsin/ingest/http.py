"""``POST /api/v1/alerts``: synchronous publishing for HTTP clients (CONTRACT §5).

The body is alert JSON (``application/json``) or a CAP 1.2 document
(``application/cap+xml``, tocsin.cap), mapped to the same alert.

Served by the gateway's HTTP listener so that every route answers on one port. The
alert takes the same path as one from ``ingest.alerts`` (``pipeline.append_alert``); a
rejected body is answered with 422 and the field errors, and is not dead-lettered: the
caller holds it and has been told.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from nats.js import JetStreamContext

from tocsin.cap import CAP_MEDIA_TYPE, MAX_CAP_BYTES, CapRules
from tocsin.core.auth import Role, TokenError, TokenVerifier, bearer
from tocsin.core.naming import Names
from tocsin.core.topology import MAX_ALERT_BYTES
from tocsin.schemas import Alert

from .metrics import IngestCounters
from .pipeline import CapAlert, Rejection, store_alert, validate_cap, validate_event

JSON_TYPES = ("application/json", "")


def publish_handler(
    verifier: TokenVerifier,
    names: Names,
    accepted_types: frozenset[str],
    jetstream: Callable[[], JetStreamContext],
    counters: IngestCounters | None = None,
    cap_rules: CapRules | None = None,
) -> Callable[[web.Request], object]:
    counted = counters or IngestCounters()
    rules = cap_rules or CapRules()

    async def publish(request: web.Request) -> web.Response:
        token = bearer(request.headers.get("Authorization")) or request.query.get("auth_token")
        try:
            claims = await verifier.averify(token)
        except TokenError as exc:
            return web.json_response({"error": exc.error, "detail": exc.detail}, status=401)
        if Role.PUBLISHER not in claims.roles and not claims.is_admin:
            return web.json_response(
                {"error": "forbidden", "detail": "roles: publishing needs 'publisher'"},
                status=403,
            )
        cap = request.content_type == CAP_MEDIA_TYPE
        if request.content_type not in JSON_TYPES and not cap:
            return web.json_response(
                {
                    "error": "unsupported_media_type",
                    "detail": f"Content-Type {request.content_type!r}: send application/json "
                    f"or {CAP_MEDIA_TYPE}",
                },
                status=415,
            )
        limit = MAX_CAP_BYTES if cap else MAX_ALERT_BYTES
        if request.content_length is not None and request.content_length > limit:
            # Refused before a byte of the body is read (a 50 MB CAP "document" too).
            return web.json_response(
                {"error": "too_large", "detail": f"body: the limit is {limit} bytes"},
                status=413,
            )
        raw = await request.read()  # whole body; client_max_size bounds it
        result: Alert | CapAlert | Rejection = (
            validate_cap(raw, accepted_types, rules) if cap else validate_event(raw, accepted_types)
        )
        if isinstance(result, Rejection):
            counted.refused(result.reason.value)
            status = 413 if result.reason == "too_large" else 422
            return web.json_response(result.as_json(), status=status)
        try:
            ack = await store_alert(jetstream(), names, result)
        except Exception:
            counted.store_failures += 1
            raise
        counted.stored(bool(ack.duplicate))
        body: dict[str, object] = {
            "alert_id": result.alert_id,
            "seq": ack.seq,
            "duplicate": bool(ack.duplicate),
        }
        if isinstance(result, CapAlert) and result.held:
            # Not in ALERTS: no seq, no device receives it (docs/integrations.md, "CAP 1.2").
            body.update(seq=None, duplicate=False, held=result.meta.status)
        return web.json_response(body, status=202)

    return publish
