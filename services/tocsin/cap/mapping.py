"""CAP 1.2 <-> the tocsin alert (docs/integrations.md, "CAP 1.2", has the tables).

:func:`to_alert` maps a schema-valid CAP ``alert`` element to an :class:`Alert` and the CAP
details tocsin keeps beside it (:class:`CapMeta`, stored in the ``Tocsin-Cap`` header of the
alert's message, never in the alert JSON); :func:`to_cap` maps them back to CAP 1.2 XML.
A CAP message mapped, emitted and mapped again gives the same alert and details.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from xml.etree.ElementTree import Element, SubElement, tostring

from pydantic import ValidationError

from tocsin.schemas.alert import (
    ALERT_ID_STR_PATTERN,
    Alert,
    AlertLevel,
    MsgType,
    Priority,
    is_region,
)

from .schema import CAP_NS, CapError, check_cap, tag

if TYPE_CHECKING:
    from tocsin.core.settings import Settings

# --- the tables ----------------------------------------------------------------------------
#: CAP severity -> alert_level. Extreme is ``emergency`` only when also Immediate and
#: Observed or Likely (LEVEL_EMERGENCY); otherwise ``critical``.
SEVERITY_LEVEL: dict[str, AlertLevel] = {
    "Extreme": AlertLevel.CRITICAL,
    "Severe": AlertLevel.HIGH,
    "Moderate": AlertLevel.MEDIUM,
    "Minor": AlertLevel.LOW,
    "Unknown": AlertLevel.MEDIUM,
}
LEVEL_EMERGENCY = ("Extreme", "Immediate", ("Observed", "Likely"))
#: CAP urgency -> priority (``emergency`` when the level is).
URGENCY_PRIORITY: dict[str, Priority] = {
    "Immediate": Priority.URGENT,
    "Expected": Priority.HIGH,
    "Future": Priority.NORMAL,
    "Past": Priority.LOW,
    "Unknown": Priority.NORMAL,
}
#: CAP certainty -> confidence_score (Unknown: none).
CERTAINTY_CONFIDENCE: dict[str, float] = {
    "Observed": 1.0,
    "Likely": 0.8,
    "Possible": 0.5,
    "Unlikely": 0.1,
}
#: The way back, for alerts that did not come as CAP (no CapMeta).
LEVEL_SEVERITY: dict[AlertLevel, str] = {
    AlertLevel.EMERGENCY: "Extreme",
    AlertLevel.CRITICAL: "Extreme",
    AlertLevel.HIGH: "Severe",
    AlertLevel.MEDIUM: "Moderate",
    AlertLevel.LOW: "Minor",
}
PRIORITY_URGENCY: dict[Priority, str] = {
    Priority.EMERGENCY: "Immediate",
    Priority.URGENT: "Immediate",
    Priority.HIGH: "Expected",
    Priority.NORMAL: "Future",
    Priority.LOW: "Past",
}
#: responseType values that mean the public must act (action_required); the way back: Prepare.
ACTING_RESPONSES = frozenset({"Shelter", "Evacuate", "Prepare", "Execute", "Avoid"})
#: geocode valueNames read as ISO 3166 codes (compared without spaces, case-insensitive).
ISO_GEOCODES = frozenset({"ISO3166-1", "ISO3166-2", "ISO3166"})
#: CAP <parameter>s named ``tocsin:<field>`` carry the alert's own values (they win over the
#: tables), so tocsin's CAP maps back to the same alert.
PARAM_PREFIX = "tocsin:"
PARAM_FIELDS = (
    "alert_level",
    "priority",
    "alert_type",
    "risk_score",
    "confidence_score",
    "affected_population",
)
#: Longer headlines and texts are cut to the alert's limits, ending in an ellipsis.
TITLE_MAX, MESSAGE_MAX = 200, 8000
ELLIPSIS = "…"
#: areaDesc, senderName and note are kept up to this length (they travel in a header).
DETAIL_MAX = 1000
#: Statuses tocsin holds back from devices (status is Actual for everything delivered).
HELD_STATUSES = frozenset({"Exercise", "System", "Test"})
CAP_ID_PREFIX = "cap-"
_ALERT_ID_RE = re.compile(ALERT_ID_STR_PATTERN)
_URL_RE = re.compile(r"^https?://\S+$")


@dataclass(frozen=True)
class TypeRule:
    category: str  # a CAP category, or "*": any
    event: str | None  # the CAP event (case-insensitive), None: any
    alert_type: str


def parse_type_rules(items: Iterable[str]) -> tuple[TypeRule, ...]:
    """``Category[/Event]=alert_type`` items (``TOCSIN_CAP_ALERT_TYPES``)."""
    rules = []
    for item in items:
        key, sep, alert_type = item.partition("=")
        if not sep or not key.strip() or not alert_type.strip():
            raise ValueError(f"{item!r}: expected Category=alert_type or Category/Event=type")
        category, _, event = key.strip().partition("/")
        rules.append(TypeRule(category.strip(), event.strip() or None, alert_type.strip()))
    return tuple(rules)


@dataclass(frozen=True)
class CapRules:
    """What the settings decide about CAP (tocsin.core.settings: TOCSIN_CAP_*)."""

    types: tuple[TypeRule, ...] = ()
    languages: tuple[str, ...] = ("en",)
    sender: str = "tocsin"

    @classmethod
    def from_settings(cls, settings: Settings) -> CapRules:
        return cls(
            parse_type_rules(settings.cap_alert_types),
            tuple(settings.cap_languages),
            settings.cap_sender,
        )

    def alert_type(self, categories: list[str], event: str) -> str | None:
        cats = {c.lower() for c in categories}
        ev = event.strip().lower()
        for want_event in (True, False):
            for rule in self.types:
                if (rule.event is not None) != want_event:
                    continue
                if rule.category.lower() in cats and (
                    rule.event is None or rule.event.lower() == ev
                ):
                    return rule.alert_type
        for rule in self.types:
            if rule.category == "*":
                return rule.alert_type
        return None

    def category_of(self, alert_type: str) -> tuple[str, str | None]:
        for rule in self.types:
            if rule.alert_type == alert_type and rule.category != "*":
                return rule.category, rule.event
        return "Other", None


@dataclass(frozen=True)
class CapMeta:
    """The CAP details an alert keeps beside its JSON, to be emitted as they came."""

    sender: str
    identifier: str
    sent: str  # as CAP wrote it (its own offset)
    status: str = "Actual"
    language: str = "en-US"
    categories: tuple[str, ...] = ("Other",)
    event: str = ""
    urgency: str = "Unknown"
    severity: str = "Unknown"
    certainty: str = "Unknown"
    response_types: tuple[str, ...] = ()
    area_desc: str = ""
    references: tuple[str, ...] = ()  # CAP triples "sender,identifier,sent"
    description_len: int | None = None  # message[:n] was the description, the rest instruction
    sender_name: str | None = None
    note: str | None = None
    #: What of this document tocsin did not keep (docs); not a detail of the alert itself.
    dropped: tuple[str, ...] = field(default=(), compare=False)

    def header(self) -> str:
        """One header line: JSON, ASCII only (NATS headers)."""
        body = {k: v for k, v in self.__dict__.items() if v not in (None, (), "")}
        return json.dumps(body, ensure_ascii=True, separators=(",", ":"))

    @classmethod
    def from_header(cls, text: str | None) -> CapMeta | None:
        if not text:
            return None
        try:
            data: dict[str, Any] = json.loads(text)
            fields: dict[str, Any] = {
                k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
            }
            return cls(**fields)
        except (ValueError, TypeError):
            return None


def derive_alert_id(sender: str, identifier: str, own_sender: str) -> str:
    """The alert_id of the CAP message ``sender`` + ``identifier``: ``cap-`` and the first 32
    hex digits of SHA-256(sender, LF, identifier), a string id of the contract's charset. A
    message of tocsin's own sender (``TOCSIN_CAP_SENDER``) whose identifier is an alert_id
    keeps it: tocsin's CAP maps back to the alert it was made from."""
    if sender == own_sender and _ALERT_ID_RE.fullmatch(identifier):
        return identifier
    digest = hashlib.sha256(f"{sender}\n{identifier}".encode()).hexdigest()
    return CAP_ID_PREFIX + digest[:32]


def reference_ids(text: str, own_sender: str) -> tuple[str, ...]:
    out = []
    for triple in text.split():
        parts = triple.split(",")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise CapError("references", f"{triple!r} is not sender,identifier,sent")
        out.append(derive_alert_id(parts[0], parts[1], own_sender))
    return tuple(dict.fromkeys(out))


# --- CAP in --------------------------------------------------------------------------------
def _text(node: Element | None, name: str) -> str | None:
    if node is None:
        return None
    child = node.find(tag(name))
    if child is None or child.text is None:
        return None
    return child.text.strip() or None


def _texts(node: Element, name: str) -> list[str]:
    return [c.text.strip() for c in node.findall(tag(name)) if c.text and c.text.strip()]


def _number(text: Any, kind: type[float] | type[int], name: str) -> float | int:
    """A ``tocsin:<name>`` parameter's text as the alert's number (the alert's fields are
    strict: CAP carries every value as text)."""
    try:
        return kind(str(text).strip())
    except ValueError:
        raise CapError(_CAP_FIELD[name], f"not a number: {text!r}") from None


def _cap_time(text: str, where: str) -> datetime:
    try:
        return datetime.fromisoformat(text).astimezone(UTC)
    except ValueError as exc:
        raise CapError(where, f"{text!r} is not a CAP dateTime") from exc


def cap_time(value: datetime) -> str:
    """A CAP dateTime: seconds, explicit offset; UTC is written -00:00 (CAP 1.2 §3.3.2)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S-00:00")


def _choose_info(infos: list[Element], languages: tuple[str, ...]) -> Element:
    def lang(info: Element) -> str:
        return (_text(info, "language") or "en-US").lower()

    for want in languages:
        w = want.lower()
        for info in infos:
            code = lang(info)
            if code == w or code.startswith(w + "-"):
                return info
    return infos[0]


def _point(area: Element, where: str) -> tuple[float, float] | None:
    def pair(text: str) -> tuple[float, float]:
        lat_s, _, lon_s = text.partition(",")
        try:
            lat, lon = float(lat_s), float(lon_s)
        except ValueError as exc:
            raise CapError(where, f"{text!r} is not lat,lon") from exc
        if not (-90 <= lat <= 90 and -180 <= lon <= 180):
            raise CapError(where, f"{text!r} is outside lat -90..90, lon -180..180")
        return lat, lon

    for circle in _texts(area, "circle"):
        return pair(circle.split()[0])
    for polygon in _texts(area, "polygon"):
        points = [pair(p) for p in polygon.split()]
        if len(points) > 1 and points[0] == points[-1]:
            points = points[:-1]
        return (
            round(sum(p[0] for p in points) / len(points), 6),
            round(sum(p[1] for p in points) / len(points), 6),
        )
    return None


def _region(areas: list[Element]) -> str:
    codes: list[str] = []
    for area in areas:
        for geocode in area.findall(tag("geocode")):
            name = (_text(geocode, "valueName") or "").replace(" ", "").upper()
            value = (_text(geocode, "value") or "").upper()
            if name in ISO_GEOCODES:
                if not is_region(value):
                    raise CapError(
                        "info.area.geocode", f"{value!r} is not an ISO 3166 code (KE, KE-30)"
                    )
                codes.append(value)
    if not codes:
        raise CapError(
            "info.area.geocode",
            "no ISO 3166 geocode (valueName ISO3166-2 or ISO3166-1): tocsin routes by region",
        )
    countries = sorted({c[:2] for c in codes})
    if len(countries) > 1:
        raise CapError(
            "info.area.geocode",
            f"the areas span several countries ({', '.join(countries)}): "
            "send one CAP message per country",
        )
    unique = set(codes)
    return unique.pop() if len(unique) == 1 else countries[0]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + ELLIPSIS


def _cut_opt(text: str | None) -> str | None:
    return None if text is None else _cut(text, DETAIL_MAX)


def to_alert(root: Element, rules: CapRules) -> tuple[Alert, CapMeta]:
    """A schema-valid CAP ``alert`` element as a tocsin alert, or CapError naming the
    element. Checks of the alert model (lengths, ranges) name the CAP element as well."""
    sender = _text(root, "sender") or ""
    identifier = _text(root, "identifier") or ""
    sent_text = _text(root, "sent") or ""
    status = _text(root, "status") or "Actual"
    cap_type = _text(root, "msgType") or "Alert"
    if status == "Draft":
        raise CapError("status", "a Draft is not disseminated")
    if cap_type in ("Ack", "Error"):
        raise CapError("msgType", f"{cap_type} acknowledges a message; it is not an alert")
    for name, value in (("sender", sender), ("identifier", identifier)):
        if re.search(r"[\s,<&]", value):
            raise CapError(name, "must not contain spaces, commas, < or &")
    msg_type = {"Alert": MsgType.ALERT, "Update": MsgType.UPDATE, "Cancel": MsgType.CANCEL}[
        cap_type
    ]
    dropped: list[str] = []
    refs_text = _text(root, "references")
    triples = tuple(refs_text.split()) if refs_text else ()
    references = reference_ids(refs_text, rules.sender) if refs_text else ()
    if msg_type is MsgType.ALERT and references:
        dropped.append("references")  # an Alert supersedes nothing
        references, triples = (), ()
    alert_id = derive_alert_id(sender, identifier, rules.sender)
    infos = root.findall(tag("info"))
    if not infos:
        raise CapError(
            "info",
            "no info block: tocsin needs its area to route the message "
            "(a Cancel too: repeat the info of the alert it cancels)",
        )
    info = _choose_info(infos, rules.languages)
    if len(infos) > 1:
        dropped.append(f"info: {len(infos) - 1} more block(s)")
    categories = _texts(info, "category")
    event = _text(info, "event") or ""
    urgency = _text(info, "urgency") or "Unknown"
    severity = _text(info, "severity") or "Unknown"
    certainty = _text(info, "certainty") or "Unknown"
    params: dict[str, str] = {}
    for p in info.findall(tag("parameter")):
        name, value = _text(p, "valueName") or "", _text(p, "value") or ""
        if name.startswith(PARAM_PREFIX) and name[len(PARAM_PREFIX) :] in PARAM_FIELDS:
            params[name[len(PARAM_PREFIX) :]] = value
    level = SEVERITY_LEVEL[severity]
    if (severity, urgency) == LEVEL_EMERGENCY[:2] and certainty in LEVEL_EMERGENCY[2]:
        level = AlertLevel.EMERGENCY
    priority = URGENCY_PRIORITY[urgency]
    if level is AlertLevel.EMERGENCY and urgency == "Immediate":
        priority = Priority.EMERGENCY
    alert_type = params.get("alert_type") or rules.alert_type(categories, event)
    if alert_type is None:
        raise CapError(
            "info.category",
            f"category {', '.join(categories)} / event {event!r} maps to no alert type "
            "(TOCSIN_CAP_ALERT_TYPES)",
            reason="unknown_type",
        )
    headline = _text(info, "headline")
    description = _text(info, "description")
    instruction = _text(info, "instruction")
    title = _cut(headline or event or alert_type, TITLE_MAX)
    texts = [t for t in (description, instruction) if t]
    message = _cut("\n\n".join(texts) or title, MESSAGE_MAX)
    description_len = len(description) if description and instruction else None
    areas = info.findall(tag("area"))
    if not areas:
        raise CapError("info.area", "no area: tocsin routes by region")
    region = _region(areas)
    point = None
    for area in areas:
        point = _point(area, "info.area")
        if point is not None:
            break
    web = _text(info, "web")
    if web and not _URL_RE.fullmatch(web):
        dropped.append("web (not an http(s) URL)")
        web = None
    expires = _text(info, "expires")
    responses = tuple(_texts(info, "responseType"))
    body: dict[str, Any] = {
        "alert_id": alert_id,
        "alert_level": params.get("alert_level", level.value),
        "alert_type": alert_type,
        "title": title,
        "message": message,
        "priority": params.get("priority", priority.value),
        "location": {"region": region}
        if point is None
        else {"region": region, "lat": point[0], "lon": point[1]},
        "action_required": bool(ACTING_RESPONSES.intersection(responses)),
        "created_at": _cap_time(sent_text, "sent"),
        "msg_type": msg_type.value,
        "references": list(references),
    }
    confidence = CERTAINTY_CONFIDENCE.get(certainty)
    if confidence is not None:
        body["confidence_score"] = confidence
    for name, kind in (
        ("risk_score", float),
        ("confidence_score", float),
        ("affected_population", int),
    ):
        if name in params:
            body[name] = _number(params[name], kind, name)
    if web:
        body["action_url"] = web
    if expires:
        body["expiry_time"] = _cap_time(expires, "info.expires")
    try:
        alert = Alert.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("int", "str")))
        raise CapError(_CAP_FIELD.get(where.split(".")[0], where), err["msg"]) from exc
    meta = CapMeta(
        sender=sender,
        identifier=identifier,
        sent=sent_text,
        status=status,
        language=_text(info, "language") or "en-US",
        categories=tuple(categories),
        event=event,
        urgency=urgency,
        severity=severity,
        certainty=certainty,
        response_types=responses,
        area_desc=_cut(_text(areas[0], "areaDesc") or "", DETAIL_MAX),
        references=triples,
        description_len=description_len,
        sender_name=_cut_opt(_text(info, "senderName")),
        note=_cut_opt(_text(root, "note")),
        dropped=tuple(dropped),
    )
    return alert, meta


#: Where each alert field comes from in CAP, to name it in errors.
_CAP_FIELD = {
    "alert_id": "identifier",
    "alert_level": f"info.parameter {PARAM_PREFIX}alert_level",
    "priority": f"info.parameter {PARAM_PREFIX}priority",
    "alert_type": "info.category",
    "title": "info.headline",
    "message": "info.description",
    "location": "info.area",
    "action_url": "info.web",
    "expiry_time": "info.expires",
    "created_at": "sent",
    "references": "references",
    "risk_score": f"info.parameter {PARAM_PREFIX}risk_score",
    "confidence_score": f"info.parameter {PARAM_PREFIX}confidence_score",
    "affected_population": f"info.parameter {PARAM_PREFIX}affected_population",
}


# --- CAP out -------------------------------------------------------------------------------
def _confidence_certainty(score: float | None) -> str:
    if score is None:
        return "Unknown"
    if score >= 0.95:
        return "Observed"
    if score > 0.5:
        return "Likely"
    if score > 0.05:
        return "Possible"
    return "Unlikely"


def _add(parent: Element, name: str, text: str | None) -> None:
    if text is not None:
        SubElement(parent, tag(name)).text = text


def to_cap(
    alert: Alert,
    meta: CapMeta | None,
    rules: CapRules,
    reference_triples: tuple[str, ...] = (),
    stored_at: datetime | None = None,
) -> bytes:
    """The alert as a CAP 1.2 document (checked against the schema before it is returned).
    ``reference_triples``: the CAP triples of ``alert.references`` when the caller looked
    them up (else tocsin's own sender and the ids)."""
    sent = meta.sent if meta else cap_time(alert.created_at or stored_at or datetime.now(UTC))
    root = Element(tag("alert"))
    _add(root, "identifier", meta.identifier if meta else str(alert.alert_id))
    _add(root, "sender", meta.sender if meta else rules.sender)
    _add(root, "sent", sent)
    _add(root, "status", meta.status if meta else "Actual")
    _add(root, "msgType", alert.msg_type.value.capitalize())
    _add(root, "scope", "Public")
    _add(root, "note", meta.note if meta else None)
    if alert.references:
        triples = (meta.references if meta else ()) or reference_triples
        if len(triples) != len(alert.referenced_ids):
            triples = tuple(f"{rules.sender},{r},{sent}" for r in alert.referenced_ids)
        _add(root, "references", " ".join(triples))
    info = SubElement(root, tag("info"))
    _add(info, "language", meta.language if meta else "en-US")
    category, event = rules.category_of(alert.alert_type)
    for cat in meta.categories if meta else (category,):
        _add(info, "category", cat)
    _add(info, "event", (meta.event if meta else None) or event or alert.alert_type)
    responses = meta.response_types if meta else (("Prepare",) if alert.action_required else ())
    for response in responses:
        _add(info, "responseType", response)
    _add(info, "urgency", meta.urgency if meta else PRIORITY_URGENCY[alert.priority])
    _add(info, "severity", meta.severity if meta else LEVEL_SEVERITY[alert.alert_level])
    _add(
        info,
        "certainty",
        meta.certainty if meta else _confidence_certainty(alert.confidence_score),
    )
    if alert.expiry_time is not None:
        _add(info, "expires", cap_time(alert.expiry_time))
    _add(info, "senderName", meta.sender_name if meta else None)
    _add(info, "headline", alert.title)
    split = meta.description_len if meta else None
    if split is not None and 0 < split < len(alert.message) - 2:
        _add(info, "description", alert.message[:split])
        _add(info, "instruction", alert.message[split + 2 :])
    else:
        _add(info, "description", alert.message)
    _add(info, "web", alert.action_url)
    for name in PARAM_FIELDS:
        value = getattr(alert, name)
        if value is not None:
            p = SubElement(info, tag("parameter"))
            _add(p, "valueName", PARAM_PREFIX + name)
            _add(p, "value", str(getattr(value, "value", value)))
    area = SubElement(info, tag("area"))
    loc = alert.location
    _add(area, "areaDesc", (meta.area_desc if meta else None) or loc.region)
    if loc.lat is not None and loc.lon is not None:
        _add(area, "circle", f"{loc.lat!r},{loc.lon!r} 0")
    geocode = SubElement(area, tag("geocode"))
    _add(geocode, "valueName", "ISO3166-1" if len(loc.region) == 2 else "ISO3166-2")
    _add(geocode, "value", loc.region)
    check_cap(root)  # tocsin never emits what the schema refuses
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        + tostring(root, encoding="unicode", default_namespace=CAP_NS).encode()
    )
