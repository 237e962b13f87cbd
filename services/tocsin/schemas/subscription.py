"""Subscriptions: groups, filters and the one predicate that decides delivery (CONTRACT §6).

Pure and I/O-free, so live delivery, backlog replay and ``tocsin tail`` all ask the same
:meth:`Subscription.matches`. A device receives an alert when all of these hold:

1. **Token bound.** The alert's region lies within one of the token's regions
   (``Claims.receivable_regions()``: ``None`` = admin = every region; ``()`` = none).
2. **Groups select (union).** No groups: every alert passes. Otherwise at least one group
   matches: ``region:KE`` – region within ``KE`` by whole code (``KE``, ``KE-30``; but
   ``KE-3`` does not contain ``KE-30``); ``level:high`` – ``alert_level`` high or above;
   ``priority:urgent`` – ``priority`` urgent or above; ``type:outbreak_risk`` – that type.
3. **Filters narrow (intersection).** Every filter that is set passes:
   ``alert_types`` – the alert's type is listed; ``risk_threshold`` – ``risk_score >=
   threshold``, where an alert without ``risk_score`` meets only a threshold of 0, and an
   ``emergency`` alert passes whatever the threshold (it stays bound by the token, the
   groups and the other filters); ``location_filter`` – below.

``location_filter`` holds ``regions`` and/or one of ``bbox`` / ``near``:

* ``{"regions": ["KE", "UG-102"]}`` – the alert's region lies within one of them (its point,
  if any, is not looked at).
* ``{"bbox": [min_lon, min_lat, max_lon, max_lat]}`` – edges inclusive; ``min_lon > max_lon``
  wraps across the antimeridian (Fiji: ``[177, -19, -178, -16]``); lon -180 and 180 are one
  meridian; a pole (lat ±90) lies in every bbox whose lat range reaches it, whatever its lon.
* ``{"near": {"lat": .., "lon": .., "radius_km": ..}}`` – great-circle distance (haversine,
  R = 6371.0088 km) ≤ radius; radius 0 matches the exact point only (at a pole: any lon).
* **Alerts without lat/lon match bbox/near only through their region:** a bare ``bbox`` or
  ``near`` never matches them. List ``regions`` beside it, e.g. ``{"near": {...}, "regions":
  ["KE-30"]}``, and an alert without a point matches when its region lies within one of
  them; an alert with a point is then still judged by its point alone.

Parsing: :meth:`Filters.from_query` takes the connect parameters as strings (an empty one
is absent; ``alert_types`` comma-separated; ``location_filter`` JSON text);
:meth:`Filters.from_update` the ``update_filters`` object — the complete new filters, a key
left out is unset. Errors are :class:`FilterError` naming the parameter. :func:`authorize`
denies a ``region:`` group unless its region lies within a token region. A subscription
persists as compact, sorted JSON (:meth:`Subscription.to_json`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .alert import ALERT_TYPE_PATTERN, Alert, AlertLevel, Priority, is_region, region_contains

EARTH_RADIUS_KM = 6371.0088
GROUP_KINDS = ("region", "level", "priority", "type")
FILTER_KEYS = ("location_filter", "risk_threshold", "alert_types")
#: Bounds that keep a subscription small enough for consumer metadata and subject filters.
MAX_GROUPS = 64
MAX_LIST = 64
_TYPE_RE = re.compile(ALERT_TYPE_PATTERN)
_LEVEL_RANK: dict[str, int] = {level: level.rank for level in AlertLevel}
_PRIORITY_RANK: dict[str, int] = {p: p.rank for p in Priority}
_GROUP_VALUES: dict[str, Callable[[str], bool]] = {
    "region": is_region,
    "level": lambda v: v in AlertLevel._value2member_map_,
    "priority": lambda v: v in Priority._value2member_map_,
    "type": lambda v: _TYPE_RE.fullmatch(v) is not None,
}


def _check_group(kind: str, value: str, text: str) -> None:
    if kind not in _GROUP_VALUES:
        raise ValueError(f"group {text!r}: unknown kind {kind!r}; use one of {GROUP_KINDS}")
    if not _GROUP_VALUES[kind](value):
        raise ValueError(f"group {text!r}: {value!r} is not a valid {kind}")


def _split_group(text: str) -> tuple[str, str]:
    kind, sep, value = text.partition(":")
    if not sep:
        raise ValueError(f"group {text!r}: expected <kind>:<value>, kind one of {GROUP_KINDS}")
    _check_group(kind, value, text)
    return kind, value


class Group(BaseModel):
    """One ``subscribe`` group; on the wire and in JSON the string ``<kind>:<value>``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    kind: Literal["region", "level", "priority", "type"]
    value: str

    @model_validator(mode="before")
    @classmethod
    def _from_str(cls, data: Any) -> Any:
        if isinstance(data, str):
            kind, value = _split_group(data)
            return {"kind": kind, "value": value}
        return data

    @model_validator(mode="after")
    def _valid(self) -> Group:
        _check_group(self.kind, self.value, str(self))
        return self

    @model_serializer
    def _to_str(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    def matches(self, alert: Alert) -> bool:
        kind = self.kind
        if kind == "region":
            return region_contains(self.value, alert.location.region)
        if kind == "level":  # StrEnum members hash as their value: one dict serves both
            return _LEVEL_RANK[alert.alert_level] >= _LEVEL_RANK[self.value]
        if kind == "priority":
            return _PRIORITY_RANK[alert.priority] >= _PRIORITY_RANK[self.value]
        return alert.alert_type == self.value


def parse_group(text: str) -> Group:
    """``region:KE`` → Group; a ValueError naming ``text`` when kind or value is wrong."""
    kind, value = _split_group(text)
    return Group.model_validate({"kind": kind, "value": value})


def _same_lon(lat: float, lon: float) -> float:
    """One lon per place: any at a pole is 0, -180 is 180."""
    return 0.0 if abs(lat) == 90 else 180.0 if lon == -180 else lon


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine); a pole is one point whatever its lon."""
    lon1, lon2 = (_same_lon(lat1, lon1), _same_lon(lat2, lon2))
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = (
        math.sin((p2 - p1) / 2) ** 2
        + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, a)))


def in_bbox(lat: float, lon: float, bbox: tuple[float, float, float, float]) -> bool:
    min_lon, min_lat, max_lon, max_lat = bbox
    if not min_lat <= lat <= max_lat:
        return False
    if abs(lat) == 90:
        return True
    for x in (180.0, -180.0) if abs(lon) == 180 else (lon,):
        if min_lon <= max_lon and min_lon <= x <= max_lon:
            return True
        if min_lon > max_lon and (x >= min_lon or x <= max_lon):
            return True
    return False


class Near(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    radius_km: float = Field(ge=0)


class LocationFilter(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    regions: tuple[str, ...] | None = None
    bbox: tuple[float, float, float, float] | None = None
    near: Near | None = None

    @field_validator("regions")
    @classmethod
    def _regions(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and not value:
            raise ValueError("list at least one region")
        if value is not None and len(value) > MAX_LIST:
            raise ValueError(f"list at most {MAX_LIST} regions")
        for code in value or ():
            if not is_region(code):
                raise ValueError(f"{code!r} is not a region code like KE or KE-30")
        return None if value is None else tuple(sorted(set(value)))

    @field_validator("bbox")
    @classmethod
    def _bbox(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        min_lon, min_lat, max_lon, max_lat = value
        if not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
            raise ValueError("lon must lie in [-180, 180]")
        if not (-90 <= min_lat <= max_lat <= 90):
            raise ValueError("lat must lie in [-90, 90] with min_lat <= max_lat")
        return value

    @model_validator(mode="after")
    def _shape(self) -> LocationFilter:
        if self.bbox is not None and self.near is not None:
            raise ValueError("give bbox or near, not both")
        if self.regions is None and self.bbox is None and self.near is None:
            raise ValueError("give regions, bbox or near")
        return self

    def matches(self, alert: Alert) -> bool:
        loc = alert.location
        area = self.bbox is not None or self.near is not None
        if area and loc.lat is not None and loc.lon is not None:
            if self.bbox is not None:
                return in_bbox(loc.lat, loc.lon, self.bbox)
            assert self.near is not None
            n = self.near
            return distance_km(n.lat, n.lon, loc.lat, loc.lon) <= n.radius_km
        return self.regions is not None and any(
            region_contains(r, loc.region) for r in self.regions
        )


class FilterError(ValueError):
    """A filter that cannot be used; ``field`` names the parameter (or ``filters``)."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class Filters(BaseModel):
    """The narrowing filters; the keys are the query parameters of CONTRACT §6."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    location_filter: LocationFilter | None = None
    risk_threshold: float | None = Field(default=None, ge=0, le=1)
    alert_types: tuple[str, ...] | None = None

    @field_validator("location_filter", mode="before")
    @classmethod
    def _json_text(cls, value: Any) -> Any:
        if isinstance(value, str | bytes):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("not valid JSON") from None
        return value

    @field_validator("risk_threshold", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be a number in [0, 1]")
        return value

    @field_validator("alert_types", mode="before")
    @classmethod
    def _types(cls, value: Any) -> Any:
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError("give a list of type names or a comma-separated string")
        names = {i.strip() for i in items} - {""}
        if not names:
            raise ValueError("name at least one type, or leave the filter out")
        if len(names) > MAX_LIST:
            raise ValueError(f"name at most {MAX_LIST} types")
        for name in names:
            if _TYPE_RE.fullmatch(name) is None:
                raise ValueError(f"{name!r} is not an alert type ({ALERT_TYPE_PATTERN})")
        return tuple(sorted(names))

    @classmethod
    def from_query(cls, params: Mapping[str, Any]) -> Filters:
        """From connect query parameters; other parameters are ignored, empty ones absent."""
        picked = {
            k: v
            for k, v in params.items()
            if k in FILTER_KEYS and not (v is None or (isinstance(v, str) and not v.strip()))
        }
        return cls._build(picked)

    @classmethod
    def from_update(cls, filters: Mapping[str, Any]) -> Filters:
        """From an ``update_filters`` frame: the same keys; unknown keys are errors."""
        if unknown := [str(k) for k in filters if k not in FILTER_KEYS]:
            raise FilterError(unknown[0], f"unknown filter; use one of {FILTER_KEYS}")
        return cls._build(dict(filters))

    @classmethod
    def _build(cls, data: dict[str, Any]) -> Filters:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "filters"
            raise FilterError(where, err["msg"].removeprefix("Value error, ")) from None

    def matches(self, alert: Alert) -> bool:
        if self.alert_types is not None and alert.alert_type not in self.alert_types:
            return False
        if (
            self.risk_threshold is not None
            and self.risk_threshold > 0
            and alert.alert_level is not AlertLevel.EMERGENCY
            and (alert.risk_score is None or alert.risk_score < self.risk_threshold)
        ):
            return False
        return self.location_filter is None or self.location_filter.matches(alert)


class Subscription(BaseModel):
    """A device's groups and filters; :meth:`matches` is the delivery decision."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    groups: frozenset[Group] = frozenset()
    filters: Filters = Filters()

    @cached_property
    def everything(self) -> bool:
        """No groups and no filters: the token alone decides (asked per alert: cached)."""
        return not self.groups and self.filters == Filters()

    def matches(self, alert: Alert, claims_regions: tuple[str, ...] | None) -> bool:
        region = alert.location.region
        if claims_regions is not None and not any(
            region_contains(r, region) for r in claims_regions
        ):
            return False
        if self.groups and not any(g.matches(alert) for g in self.groups):
            return False
        return self.filters.matches(alert)

    def subscribe(self, groups: Iterable[Group]) -> Subscription:
        return Subscription(groups=self.groups | frozenset(groups), filters=self.filters)

    def unsubscribe(self, groups: Iterable[Group]) -> Subscription:
        return Subscription(groups=self.groups - frozenset(groups), filters=self.filters)

    def as_dict(self) -> dict[str, Any]:
        """``{"groups": [sorted names], "filters": {set keys only}}``, as frames show it."""
        return {
            "groups": sorted(str(g) for g in self.groups),
            "filters": self.filters.model_dump(mode="json", exclude_none=True),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Subscription:
        return cls.model_validate_json(text)


def authorize(
    groups: Iterable[Group], claims_regions: tuple[str, ...] | None
) -> tuple[tuple[Group, ...], tuple[Group, ...]]:
    """Split ``groups`` into (allowed, denied), in first-seen order without repeats.

    A ``region:`` group is allowed when its region lies within a token region (admin:
    always); other groups are always allowed, since the token still bounds what they match.
    """
    allowed: list[Group] = []
    denied: list[Group] = []
    for g in dict.fromkeys(groups):
        ok = (
            g.kind != "region"
            or claims_regions is None
            or any(region_contains(r, g.value) for r in claims_regions)
        )
        (allowed if ok else denied).append(g)
    return tuple(allowed), tuple(denied)
