"""The reference for subscriptions (CONTRACT §6, issue 3): a small predicate written from the
contract, independently of ``tocsin.schemas.subscription``, and the hypothesis strategies that
draw alerts, subscriptions and tokens for it.

Both the unit property tests (``tests/unit/test_subscription.py``, against
``Subscription.matches``) and the socket property tests
(``tests/gateway/test_subscription_properties.py``, against what a real gateway delivers)
judge by :func:`reference`. Alerts and subscriptions are plain dicts here:

* alert: ``region``, ``level``, ``priority``, ``type``, ``point`` (``(lat, lon)`` or None),
  ``risk`` (``risk_score`` or None);
* subscription: ``groups`` (group texts), ``types`` (``alert_types`` or None),
  ``types_as_text`` (send them comma-separated), ``risk_threshold``, ``location``
  (the ``location_filter`` object or None);
* token: a list of regions, or None for admin (every region).
"""

from __future__ import annotations

import math
from typing import Any

from hypothesis import strategies as st

from tocsin.schemas.subscription import EARTH_RADIUS_KM

FIJI = [177, -19, -178, -16]

LEVELS = ["low", "medium", "high", "critical", "emergency"]
PRIORITIES = ["low", "normal", "high", "urgent", "emergency"]
TYPES = ["outbreak_risk", "system_health", "data_quality", "flood"]
REGIONS = ["KE", "KE-3", "KE-30", "KE-301", "UG", "UG-1", "UG-102", "FJ", "FJ-C"]
LATS = [-90.0, -19.0, -17.5, -16.0, 0.0, 0.5, 16.0, 89.99, 90.0]
LONS = [-180.0, -179.0, -178.0, 0.0, 34.77, 177.0, 178.5, 180.0]


class TooClose(Exception):
    """The point lies within rounding of a near radius: the reference does not judge."""


def ref_within(prefix: str, region: str) -> bool:
    want = prefix.split("-")
    return region.split("-")[: len(want)] == want


def ref_group(text: str, a: dict[str, Any]) -> bool:
    kind, value = text.split(":", 1)
    if kind == "region":
        return ref_within(value, a["region"])
    if kind == "level":
        return LEVELS.index(a["level"]) >= LEVELS.index(value)
    if kind == "priority":
        return PRIORITIES.index(a["priority"]) >= PRIORITIES.index(value)
    type_: str = a["type"]
    return type_ == value


def ref_lon_in(lon: float, west: float, east: float) -> bool:
    spans = [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]
    spellings = [lon, -lon] if abs(lon) == 180 else [lon]
    return any(lo <= x <= hi for lo, hi in spans for x in spellings)


def ref_same_place(p: tuple[float, float], q: tuple[float, float]) -> bool:
    if p[0] != q[0]:
        return False
    return abs(p[0]) == 90 or p[1] == q[1] or abs(p[1]) == abs(q[1]) == 180


def ref_distance(p: tuple[float, float], q: tuple[float, float]) -> float:
    """Chord through the sphere, then the arc: a different route than haversine."""

    def unit(lat: float, lon: float) -> list[float]:
        la, lo = math.radians(lat), math.radians(lon)
        return [math.cos(la) * math.cos(lo), math.cos(la) * math.sin(lo), math.sin(la)]

    chord = math.dist(unit(*p), unit(*q))
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, chord / 2))


def ref_location(spec: dict[str, Any], a: dict[str, Any]) -> bool:
    point = a["point"]
    if point is not None and ("bbox" in spec or "near" in spec):
        if "bbox" in spec:
            west, south, east, north = spec["bbox"]
            if not south <= point[0] <= north:
                return False
            return abs(point[0]) == 90 or ref_lon_in(point[1], west, east)
        center = (spec["near"]["lat"], spec["near"]["lon"])
        radius: float = spec["near"]["radius_km"]
        if ref_same_place(point, center):
            return True
        d = ref_distance(point, center)
        if abs(d - radius) < 1e-3:
            raise TooClose
        return d < radius
    return any(ref_within(r, a["region"]) for r in spec.get("regions", []))


def reference(a: dict[str, Any], s: dict[str, Any], token: list[str] | None) -> bool:
    if token is not None and not any(ref_within(r, a["region"]) for r in token):
        return False
    if s["groups"] and not any(ref_group(g, a) for g in s["groups"]):
        return False
    if s["types"] is not None and a["type"] not in s["types"]:
        return False
    threshold = s["risk_threshold"]
    if threshold is not None and threshold > 0 and a["level"] != "emergency":
        if a["risk"] is None or a["risk"] < threshold:
            return False
    return s["location"] is None or ref_location(s["location"], a)


lats = st.sampled_from(LATS) | st.floats(-90, 90)
lons = st.sampled_from(LONS) | st.floats(-180, 180)
unit_floats = st.sampled_from([0.0, 0.3, 0.5, 1.0]) | st.floats(0, 1)
alerts = st.fixed_dictionaries(
    {
        "region": st.sampled_from(REGIONS),
        "level": st.sampled_from(LEVELS),
        "priority": st.sampled_from(PRIORITIES),
        "type": st.sampled_from(TYPES),
        "point": st.none() | st.tuples(lats, lons),
        "risk": st.none() | unit_floats,
    }
)
group_texts = st.one_of(
    st.sampled_from(REGIONS).map("region:{}".format),
    st.sampled_from(LEVELS).map("level:{}".format),
    st.sampled_from(PRIORITIES).map("priority:{}".format),
    st.sampled_from(TYPES).map("type:{}".format),
)
SPECIAL_BBOXES = [
    FIJI,
    [-180, -90, 180, 90],
    [0, 80, 10, 90],
    [170, -10, 180, 10],
    [-180, -90, -170, -80],
]
bboxes = st.sampled_from(SPECIAL_BBOXES) | st.builds(
    lambda w, e, la: [w, min(la), e, max(la)], lons, lons, st.tuples(lats, lats)
)
SPECIAL_NEARS = [
    {"lat": 90.0, "lon": 0.0, "radius_km": 0.0},
    {"lat": -17.5, "lon": 180.0, "radius_km": 0.0},
    {"lat": 0.5, "lon": 34.77, "radius_km": 0.0},
]
nears = st.sampled_from(SPECIAL_NEARS) | st.fixed_dictionaries(
    {
        "lat": lats,
        "lon": lons,
        "radius_km": st.sampled_from([0.0, 1.0, 100.0, 2000.0, 20000.0]) | st.floats(0, 21000),
    }
)
region_lists = st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3)
locations = st.one_of(
    st.none(),
    region_lists.map(lambda r: {"regions": r}),
    bboxes.map(lambda b: {"bbox": b}),
    nears.map(lambda n: {"near": n}),
    st.tuples(bboxes, region_lists).map(lambda t: {"bbox": t[0], "regions": t[1]}),
    st.tuples(nears, region_lists).map(lambda t: {"near": t[0], "regions": t[1]}),
)
subscriptions = st.fixed_dictionaries(
    {
        "groups": st.lists(group_texts, max_size=4),
        "types": st.none() | st.lists(st.sampled_from(TYPES), min_size=1, max_size=3),
        "types_as_text": st.booleans(),
        "risk_threshold": st.none() | unit_floats,
        "location": locations,
    }
)
tokens = st.none() | st.lists(st.sampled_from(REGIONS), max_size=3)
#: Tokens a gateway lets in: admin, or at least one region (no regions is refused with 403).
wire_tokens = st.none() | st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3)


def ref_allowed(group: str, token: list[str] | None) -> bool:
    """May a device with ``token`` hold ``group``: a ``region:`` group only within the token."""
    kind, value = group.split(":", 1)
    return kind != "region" or token is None or any(ref_within(r, value) for r in token)


def edge_points(location: dict[str, Any] | None) -> list[tuple[float, float]]:
    """Points on the edges of a subscription's area: corners, ±180, poles, the centre."""
    points: list[tuple[float, float]] = [(90.0, 123.0), (-90.0, -45.0)]
    if location and "bbox" in location:
        west, south, east, north = location["bbox"]
        points += [(lat, lon) for lat in (south, north) for lon in (west, east, 180.0, -180.0)]
    if location and "near" in location:
        lat, lon = location["near"]["lat"], location["near"]["lon"]
        points += [(lat, lon), (lat, -lon), (lat, 7.0)]
    return points


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], list[str] | None]:
    """An alert, a subscription and a token; the alert often sits on the subscription's edges."""
    s = draw(subscriptions)
    a = draw(alerts)
    if a["point"] is not None and draw(st.booleans()):
        a["point"] = draw(st.sampled_from(edge_points(s["location"])))
    return a, s, draw(tokens)
