"""Validation and append: the one path every alert takes into ``ALERTS`` (NATS and HTTP)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import PubAck
from pydantic import ValidationError

from tocsin.cap import MAX_CAP_BYTES, CapError, CapMeta, CapRules, parse_cap, to_alert
from tocsin.cap.mapping import HELD_STATUSES
from tocsin.cap.schema import looks_like_xml
from tocsin.core.alert_index import hold, index_appended
from tocsin.core.naming import (
    CAP_HEADER,
    ERRORS_HEADER,
    EXPIRES_HEADER,
    MSG_ID_HEADER,
    REASON_HEADER,
    TTL_HEADER,
    Names,
)
from tocsin.core.topology import MAX_ALERT_BYTES
from tocsin.schemas import Alert

#: Headers tocsin puts on every ``ALERTS`` message.


class Reason(StrEnum):
    """Why an event was rejected; also the last token of its DLQ subject."""

    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    INVALID_ALERT = "invalid_alert"
    UNKNOWN_TYPE = "unknown_type"
    EXPIRED = "expired"
    INVALID_CAP = "invalid_cap"


@dataclass(frozen=True)
class Rejection:
    reason: Reason
    errors: list[dict[str, str]] = field(default_factory=list)

    @property
    def detail(self) -> str:
        return "; ".join(
            f"{e['field']}: {e['message']}" if e["field"] else e["message"] for e in self.errors
        )

    def as_json(self) -> dict[str, Any]:
        return {"error": self.reason.value, "detail": self.detail, "errors": self.errors}


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    out = []
    for err in exc.errors():
        # Union branches add their type name to the path (alert_id.int); keep the field.
        loc = [str(p) for p in err["loc"] if not str(p).startswith(("int", "str", "constrained"))]
        out.append({"field": ".".join(loc), "message": err["msg"]})
    return out


def validate_event(
    raw: bytes, accepted_types: frozenset[str], now: float | None = None
) -> Alert | Rejection:
    """Turn raw bytes into an :class:`Alert`, or say exactly why not."""
    if len(raw) > MAX_ALERT_BYTES:
        return Rejection(
            Reason.TOO_LARGE,
            [
                {
                    "field": "",
                    "message": f"event is {len(raw)} bytes; the limit is {MAX_ALERT_BYTES}",
                }
            ],
        )
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Rejection(Reason.INVALID_JSON, [{"field": "", "message": f"not JSON: {exc}"}])
    if not isinstance(data, dict):
        return Rejection(Reason.INVALID_JSON, [{"field": "", "message": "expected a JSON object"}])
    try:
        alert = Alert.model_validate(data)
    except ValidationError as exc:
        return Rejection(Reason.INVALID_ALERT, _field_errors(exc))
    return _check_alert(alert, accepted_types, now)


def _check_alert(
    alert: Alert, accepted_types: frozenset[str], now: float | None
) -> Alert | Rejection:
    """What the model cannot check alone: the configured types, the clock."""
    if alert.alert_type not in accepted_types:
        allowed = ", ".join(sorted(accepted_types))
        return Rejection(
            Reason.UNKNOWN_TYPE,
            [{"field": "alert_type", "message": f"{alert.alert_type!r} is not one of: {allowed}"}],
        )
    if alert.expiry_time is not None and alert.expiry_time.timestamp() <= (
        time.time() if now is None else now
    ):
        return Rejection(
            Reason.EXPIRED,
            [
                {
                    "field": "expiry_time",
                    "message": "already passed; an expired alert is never delivered",
                }
            ],
        )
    return alert


@dataclass(frozen=True)
class CapAlert:
    """An alert that came as CAP, with the CAP details tocsin keeps beside it."""

    alert: Alert
    meta: CapMeta

    @property
    def alert_id(self) -> int | str:
        return self.alert.alert_id

    @property
    def held(self) -> bool:
        """Its status (Exercise, Test, System) keeps it from devices (core/alert_index.py)."""
        return self.meta.status in HELD_STATUSES


def validate_cap(
    raw: bytes, accepted_types: frozenset[str], rules: CapRules, now: float | None = None
) -> CapAlert | Rejection:
    """A CAP 1.2 document as an alert (safe parsing, the schema, the mapping), or why not."""
    if len(raw) > MAX_CAP_BYTES:
        message = f"CAP document is {len(raw)} bytes; the limit is {MAX_CAP_BYTES}"
        return Rejection(Reason.TOO_LARGE, [{"field": "", "message": message}])
    try:
        alert, meta = to_alert(parse_cap(raw), rules)
    except CapError as exc:
        return Rejection(Reason(exc.reason), [{"field": exc.field, "message": exc.message}])
    checked = _check_alert(alert, accepted_types, now)
    if isinstance(checked, Rejection):
        return checked
    return CapAlert(alert, meta)


def validate_any(
    raw: bytes, accepted_types: frozenset[str], rules: CapRules, now: float | None = None
) -> Alert | CapAlert | Rejection:
    """An event of ``ingest.alerts``: CAP XML when it starts with ``<``, else alert JSON."""
    if looks_like_xml(raw):
        return validate_cap(raw, accepted_types, rules, now)
    return validate_event(raw, accepted_types, now)


async def store_alert(
    js: JetStreamContext, names: Names, result: Alert | CapAlert, now: float | None = None
) -> PubAck:
    """The ingest path's store: append to ``ALERTS`` and index it (core/alert_index.py); a
    held CAP alert (status not Actual) goes to the index only. Idempotent: a repeat (an
    event redelivered) finds its first seq and writes the same index entries."""
    if isinstance(result, CapAlert):
        if result.held:
            return await hold(js, names, encode_alert(result.alert), result.meta.header())
        alert, extra = result.alert, {CAP_HEADER: result.meta.header()}
    else:
        alert, extra = result, {}
    ack = await append_alert(js, names, alert, now, extra)
    await index_appended(js, names, alert, ack.seq)
    return ack


def encode_alert(alert: Alert) -> bytes:
    """The canonical JSON stored in ``ALERTS`` and sent verbatim inside ``alert`` frames."""
    return alert.model_dump_json(exclude_none=True).encode()


async def append_alert(
    js: JetStreamContext,
    names: Names,
    alert: Alert,
    now: float | None = None,
    extra_headers: dict[str, str] | None = None,
) -> PubAck:
    """Append to ``ALERTS``; idempotent by ``alert_id`` within the duplicate window."""
    headers = {**(extra_headers or {}), MSG_ID_HEADER: alert.msg_id}
    if alert.expiry_time is not None:
        expires = alert.expiry_time.timestamp()
        headers[EXPIRES_HEADER] = f"{expires:.3f}"
        # JetStream TTLs are whole seconds: round up, the gateway checks the exact time.
        headers[TTL_HEADER] = str(
            max(1, math.ceil(expires - (time.time() if now is None else now)))
        )
    subject = names.alert_subject(alert.location.region, alert.alert_level.value, alert.alert_type)
    return await js.publish(subject, encode_alert(alert), headers=headers)


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    raw: bytes,
    rejection: Rejection,
    headers: dict[str, str] | None = None,
) -> PubAck:
    """Keep a rejected event, byte for byte, with the reason; never drop it silently."""
    # JetStream acts on Nats-* headers (Nats-Expected-Stream, Nats-Msg-Id, ...): keep the
    # engine's own headers, never those, or the dead letter itself would be refused.
    hdrs = {k: v for k, v in (headers or {}).items() if not k.lower().startswith("nats-")}
    hdrs[REASON_HEADER] = rejection.reason.value
    hdrs[ERRORS_HEADER] = orjson.dumps(rejection.errors).decode()
    return await js.publish(names.dlq_subject(rejection.reason.value), raw, headers=hdrs)
