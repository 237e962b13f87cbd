"""Subscriptions (CONTRACT §6, issue 3): groups, filters, token bounds — the pure predicate.

The named edge cases come first; then hypothesis checks ``Subscription.matches`` against a
small reference predicate written from the contract, independently of the module
(tests/reference.py, shared with the socket property tests).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tocsin.schemas.alert import Alert, AlertLevel, Location, Priority
from tocsin.schemas.subscription import (
    EARTH_RADIUS_KM,
    FilterError,
    Filters,
    Group,
    LocationFilter,
    Subscription,
    authorize,
    distance_km,
    parse_group,
)

from ..reference import (
    FIJI,
    TYPES,
    TooClose,
    alerts,
    cases,
    edge_points,
    group_texts,
    locations,
    ref_location,
    ref_within,
    reference,
    tokens,
    unit_floats,
)

ORIGIN = {"lat": 0, "lon": 0, "radius_km": 1}


def alert(
    region: str = "KE-30",
    *,
    level: str = "high",
    priority: str = "normal",
    type_: str = "outbreak_risk",
    point: tuple[float, float] | None = None,
    risk: float | None = None,
) -> Alert:
    location = (
        Location(region=region)
        if point is None
        else Location(region=region, lat=point[0], lon=point[1])
    )
    return Alert(
        alert_id=1,
        alert_level=AlertLevel(level),
        alert_type=type_,
        title="t",
        message="m",
        priority=Priority(priority),
        location=location,
        risk_score=risk,
    )


def sub(*groups: str, **filters: Any) -> Subscription:
    return Subscription(
        groups=frozenset(parse_group(g) for g in groups), filters=Filters.from_update(filters)
    )


def loc(spec: dict[str, Any], a: Alert) -> bool:
    return sub(location_filter=spec).matches(a, None)


# --- location: bbox -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lat", "lon", "inside"),
    [
        (-17.5, 178.0, True),
        (-17.5, -179.0, True),
        (-17.5, 180.0, True),
        (-17.5, -180.0, True),
        (-19.0, 177.0, True),  # corner: edges are inclusive
        (-16.0, -178.0, True),
        (-17.5, 176.9, False),
        (-17.5, -177.9, False),
        (-17.5, 0.0, False),
        (-15.9, 178.0, False),
    ],
)
def test_bbox_across_the_antimeridian_fiji(lat: float, lon: float, inside: bool) -> None:
    assert loc({"bbox": FIJI}, alert("FJ", point=(lat, lon))) is inside


def test_bbox_ending_on_the_antimeridian_holds_both_spellings_of_it() -> None:
    assert loc({"bbox": [170, -10, 180, 10]}, alert(point=(0, -180)))
    assert loc({"bbox": [-180, -10, -170, 10]}, alert(point=(0, 180)))
    assert not loc({"bbox": [-180, -10, -170, 10]}, alert(point=(0, 179.9)))


def test_whole_world_bbox_holds_everything_with_a_point() -> None:
    for point in [(0, 0), (90, 12), (-90, -180), (45, 180), (-45, -179.5)]:
        assert loc({"bbox": [-180, -90, 180, 90]}, alert(point=point))


def test_bbox_touching_a_pole_holds_the_pole_whatever_its_lon() -> None:
    north = {"bbox": [0, 80, 10, 90]}
    assert loc(north, alert(point=(90, 120)))
    assert loc(north, alert(point=(90, -180)))
    assert not loc(north, alert(point=(89.9, 120)))
    assert loc({"bbox": [170, -90, -170, -85]}, alert(point=(-90, 0)))
    assert not loc({"bbox": [0, 80, 10, 89]}, alert(point=(90, 5)))


# --- location: near -------------------------------------------------------------------------


def test_haversine_known_distances() -> None:
    assert distance_km(0, 0, 0, 1) == pytest.approx(EARTH_RADIUS_KM * math.pi / 180)
    assert distance_km(0, 0, 0, 180) == pytest.approx(EARTH_RADIUS_KM * math.pi)
    assert distance_km(90, 0, -90, 0) == pytest.approx(EARTH_RADIUS_KM * math.pi)
    # Nairobi to Kisumu (KE-30 ~ 34.77 E) is about 265 km.
    assert distance_km(-1.286, 36.817, -0.09, 34.77) == pytest.approx(262, abs=5)


def test_near_radius_zero_matches_the_exact_point_only() -> None:
    here = {"near": {"lat": -0.09, "lon": 34.77, "radius_km": 0}}
    assert loc(here, alert(point=(-0.09, 34.77)))
    assert not loc(here, alert(point=(-0.09, 34.770001)))
    dateline = {"near": {"lat": 10, "lon": 180, "radius_km": 0}}
    assert loc(dateline, alert(point=(10, -180)))


def test_near_the_north_pole_any_lon_is_the_pole() -> None:
    pole = {"near": {"lat": 90, "lon": 0, "radius_km": 0}}
    for lon in (-180, -45.5, 0, 77, 180):
        assert loc(pole, alert(point=(90, lon)))
    assert not loc(pole, alert(point=(89.9999, 0)))
    assert not loc(pole, alert(point=(-90, 0)))
    wide = {"near": {"lat": 90, "lon": -120, "radius_km": 112}}
    assert loc(wide, alert(point=(89, 33)))  # one degree of lat ~ 111.2 km, any lon
    assert not loc(wide, alert(point=(88.9, 33)))


def test_near_across_the_antimeridian() -> None:
    near = {"near": {"lat": -17.7, "lon": 179.9, "radius_km": 30}}
    assert loc(near, alert("FJ", point=(-17.7, -179.9)))  # ~21 km east, across 180
    assert not loc(near, alert("FJ", point=(-17.7, 179.5)))  # ~42 km west


# --- location: alerts without a point ---------------------------------------------------------


def test_alert_without_a_point_never_matches_a_bare_bbox_or_near() -> None:
    a = alert("FJ-C")
    assert not loc({"bbox": FIJI}, a)
    assert not loc({"near": {"lat": -17.7, "lon": 178, "radius_km": 20000}}, a)


def test_alert_without_a_point_matches_bbox_or_near_through_listed_regions() -> None:
    for area in ({"bbox": FIJI}, {"near": {"lat": -17.7, "lon": 178, "radius_km": 10}}):
        assert loc(area | {"regions": ["FJ"]}, alert("FJ-C"))
        assert not loc(area | {"regions": ["FJ-W"]}, alert("FJ-C"))
        # With a point, the point alone decides: region FJ but outside the area.
        assert not loc(area | {"regions": ["FJ"]}, alert("FJ-C", point=(0, 0)))
        assert loc(area | {"regions": ["UG"]}, alert("FJ-C", point=(-17.7, 178)))


def test_regions_filter_ignores_the_point() -> None:
    assert loc({"regions": ["KE"]}, alert("KE-30", point=(60, 60)))
    assert not loc({"regions": ["UG"]}, alert("KE-30", point=(0.3, 32.6)))


# --- groups -----------------------------------------------------------------------------------


def test_region_groups_go_by_whole_codes() -> None:
    assert sub("region:KE").matches(alert("KE-30"), None)
    assert sub("region:KE").matches(alert("KE"), None)
    assert sub("region:KE-3").matches(alert("KE-3"), None)
    assert not sub("region:KE-3").matches(alert("KE-30"), None)
    assert not sub("region:KE-30").matches(alert("KE"), None)
    assert not sub("region:UG").matches(alert("KE-30"), None)


@pytest.mark.parametrize(
    "text",
    [
        "region:UGA",  # an alpha-3 looking code is not a region here
        "region:ug",
        "region:KE-",
        "region:KE-3000",
        "region:KE:30",
        "region:",
        "level:extreme",
        "level:HIGH",
        "priority:asap",
        "type:Outbreak",
        "type:",
        "country:KE",
        "region",
        "",
        ":KE",
    ],
)
def test_unknown_or_malformed_group_is_invalid_and_names_itself(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_group(text)
    assert repr(text) in str(err.value)
    with pytest.raises(ValidationError):
        Subscription.model_validate({"groups": [text]})


def test_level_and_priority_groups_include_higher() -> None:
    assert sub("level:high").matches(alert(level="critical"), None)
    assert sub("level:high").matches(alert(level="emergency"), None)
    assert not sub("level:high").matches(alert(level="medium"), None)
    assert sub("priority:urgent").matches(alert(priority="emergency"), None)
    assert not sub("priority:urgent").matches(alert(priority="high"), None)
    assert sub("type:system_health").matches(alert(type_="system_health"), None)
    assert not sub("type:system_health").matches(alert(type_="outbreak_risk"), None)


def test_empty_groups_receive_everything_the_token_allows() -> None:
    s = Subscription()
    assert s.matches(alert("KE-30", level="low"), ("KE",))
    assert not s.matches(alert("UG", level="emergency"), ("KE",))


def test_groups_select_as_a_union_and_filters_narrow() -> None:
    s = sub("region:UG", "level:critical", risk_threshold=0.5)
    assert s.matches(alert("UG", level="low", risk=0.6), None)
    assert s.matches(alert("KE", level="critical", risk=0.6), None)
    assert not s.matches(alert("KE", level="high", risk=0.6), None)
    assert not s.matches(alert("UG", level="low", risk=0.4), None)


# --- tokens -----------------------------------------------------------------------------------


def test_token_with_no_regions_matches_nothing_and_admin_everything() -> None:
    for s in (Subscription(), sub("region:KE"), sub("level:low")):
        assert not s.matches(alert("KE-30", level="emergency"), ())
        assert s.matches(alert("KE-30", level="emergency"), None)


def test_token_regions_bound_groups_and_filters() -> None:
    s = sub("region:KE", location_filter={"regions": ["KE"]})
    assert s.matches(alert("KE-30"), ("KE-30",))
    assert not s.matches(alert("KE-31"), ("KE-30",))
    assert not sub().matches(alert("KE-30"), ("KE-3",))


def test_authorize_denies_region_groups_outside_the_token() -> None:
    groups = [parse_group(g) for g in ("region:KE", "region:KE-30", "level:high", "region:UG")]
    allowed, denied = authorize([*groups, groups[1]], ("KE-30",))
    assert [str(g) for g in allowed] == ["region:KE-30", "level:high"]
    assert [str(g) for g in denied] == ["region:KE", "region:UG"]
    assert authorize(groups, None) == (tuple(groups), ())
    allowed, denied = authorize(groups, ())
    assert [str(g) for g in allowed] == ["level:high"]
    assert authorize(groups, ("KE",))[1] == (groups[3],)


# --- risk threshold and types -------------------------------------------------------------------


def test_emergency_ignores_risk_threshold_but_nothing_else() -> None:
    s = sub(risk_threshold=0.9)
    assert s.matches(alert(level="emergency", risk=0.1), None)
    assert s.matches(alert(level="emergency"), None)
    assert not s.matches(alert(level="critical", risk=0.89), None)
    assert not s.matches(alert("UG", level="emergency"), ("KE",))
    assert not sub("region:UG", risk_threshold=0.9).matches(alert(level="emergency"), None)
    typed = sub(risk_threshold=0.9, alert_types="system_health")
    assert not typed.matches(alert(level="emergency"), None)


def test_missing_risk_score_meets_only_a_zero_threshold() -> None:
    assert sub(risk_threshold=0).matches(alert(), None)
    assert not sub(risk_threshold=0.01).matches(alert(), None)
    assert sub(risk_threshold=0.5).matches(alert(risk=0.5), None)  # inclusive
    assert sub().matches(alert(), None)


def test_alert_types_from_a_comma_separated_string() -> None:
    f = Filters.from_query({"alert_types": " system_health,outbreak_risk,,system_health "})
    assert f.alert_types == ("outbreak_risk", "system_health")
    assert Filters.from_update({"alert_types": ["data_quality"]}).alert_types == ("data_quality",)
    s = Subscription(filters=f)
    assert s.matches(alert(type_="outbreak_risk"), None)
    assert not s.matches(alert(type_="data_quality"), None)


# --- parsing ------------------------------------------------------------------------------------


def test_from_query_parses_strings_and_ignores_other_parameters() -> None:
    f = Filters.from_query(
        {
            "auth_token": "x",
            "client_id": "phone",
            "ack_mode": "auto",
            "location_filter": json.dumps({"bbox": FIJI}),
            "risk_threshold": "0.25",
            "alert_types": "",
        }
    )
    assert f == Filters(
        location_filter=LocationFilter(bbox=(177, -19, -178, -16)), risk_threshold=0.25
    )
    assert Filters.from_query({}) == Filters()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"risk_threshold": "abc"}, "risk_threshold"),
        ({"risk_threshold": "1.5"}, "risk_threshold"),
        ({"risk_threshold": "-0.1"}, "risk_threshold"),
        ({"risk_threshold": "nan"}, "risk_threshold"),
        ({"risk_threshold": True}, "risk_threshold"),
        ({"alert_types": "Outbreak"}, "alert_types"),
        ({"alert_types": ",,"}, "alert_types"),
        ({"location_filter": "{"}, "location_filter"),
        ({"location_filter": "[1, 2]"}, "location_filter"),
        ({"location_filter": "{}"}, "location_filter"),
        ({"location_filter": '{"circle": 1}'}, "location_filter"),
        ({"location_filter": '{"regions": []}'}, "location_filter"),
        ({"location_filter": '{"regions": ["KEN"]}'}, "location_filter"),
        ({"location_filter": '{"bbox": [1, 2, 3]}'}, "location_filter"),
        ({"location_filter": '{"bbox": [0, 10, 1, 5]}'}, "location_filter"),
        ({"location_filter": '{"bbox": [0, 0, 181, 5]}'}, "location_filter"),
        ({"location_filter": '{"bbox": [0, -91, 1, 5]}'}, "location_filter"),
        ({"location_filter": '{"near": {"lat": 0, "lon": 0, "radius_km": -1}}'}, "location_filter"),
        ({"location_filter": '{"near": {"lat": 91, "lon": 0, "radius_km": 1}}'}, "location_filter"),
        ({"location_filter": '{"near": {"lat": 0, "lon": 0}}'}, "location_filter"),
        ({"location_filter": json.dumps({"bbox": FIJI, "near": ORIGIN})}, "location_filter"),
    ],
)
def test_from_query_errors_name_the_parameter(params: dict[str, Any], field: str) -> None:
    with pytest.raises(FilterError) as err:
        Filters.from_query(params)
    assert err.value.field.split(".")[0] == field
    assert str(err.value).startswith(field)


def test_from_update_rejects_unknown_keys() -> None:
    with pytest.raises(FilterError) as err:
        Filters.from_update({"risk": 0.5})
    assert err.value.field == "risk"


def test_models_are_frozen_and_strict() -> None:
    s = sub("region:KE")
    with pytest.raises(ValidationError):
        s.groups = frozenset()  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Subscription.model_validate({"groups": [], "extra": 1})
    with pytest.raises(ValidationError):
        Group.model_validate({"kind": "region", "value": "KEN"})


def test_json_is_stable_sorted_and_small() -> None:
    a = sub("region:UG", "level:high", alert_types="system_health,outbreak_risk")
    b = sub("level:high", "region:UG", alert_types=["outbreak_risk", "system_health"])
    assert a.to_json() == b.to_json()
    doc = json.loads(a.to_json())
    assert doc["groups"] == ["level:high", "region:UG"]
    assert Subscription.from_json(a.to_json()) == a
    many = sub(*(f"region:KE-{i}" for i in range(64)), location_filter={"bbox": FIJI})
    assert len(many.to_json()) < 4096
    assert Subscription.from_json(Subscription().to_json()) == Subscription()


# --- property tests against a reference (tests/reference.py) ---------------------------------


def build_alert(a: dict[str, Any]) -> Alert:
    return alert(
        a["region"],
        level=a["level"],
        priority=a["priority"],
        type_=a["type"],
        point=a["point"],
        risk=a["risk"],
    )


def build_subscription(s: dict[str, Any]) -> Subscription:
    filters: dict[str, Any] = {"risk_threshold": s["risk_threshold"]}
    if s["types"] is not None:
        filters["alert_types"] = ",".join(s["types"]) if s["types_as_text"] else s["types"]
    if s["location"] is not None:
        filters["location_filter"] = json.dumps(s["location"])
    return Subscription(
        groups=frozenset(parse_group(g) for g in s["groups"]),
        filters=Filters.from_query(filters),
    )


@settings(max_examples=500, deadline=None)
@given(cases())
def test_matches_equals_the_reference(
    case: tuple[dict[str, Any], dict[str, Any], list[str] | None],
) -> None:
    a, s, token = case
    try:
        expected = reference(a, s, token)
    except TooClose:
        assume(False)
    subscription = build_subscription(s)
    claims = None if token is None else tuple(token)
    assert subscription.matches(build_alert(a), claims) is expected
    again = Subscription.from_json(subscription.to_json())
    assert again == subscription
    assert again.to_json() == subscription.to_json()
    assert again.matches(build_alert(a), claims) is expected


@settings(max_examples=500, deadline=None)
@given(locations.filter(lambda x: x is not None), st.data())
def test_location_filter_equals_the_reference(
    loc_spec: dict[str, Any], data: st.DataObject
) -> None:
    a = data.draw(alerts)
    if a["point"] is not None and data.draw(st.booleans()):
        a["point"] = data.draw(st.sampled_from(edge_points(loc_spec)))
    try:
        expected = ref_location(loc_spec, a)
    except TooClose:
        assume(False)
    f = Filters.from_update({"location_filter": loc_spec})
    assert f.matches(build_alert(a)) is expected


@given(
    alerts,
    st.none() | unit_floats | st.just("risk"),
    st.none() | st.lists(st.sampled_from(TYPES), min_size=1),
)
def test_risk_and_type_filters_equal_the_reference(
    a: dict[str, Any], threshold: float | str | None, types: list[str] | None
) -> None:
    if threshold == "risk":  # exactly the alert's score: the threshold is inclusive
        threshold = a["risk"]
    s = {"groups": [], "types": types, "risk_threshold": threshold, "location": None}
    filters = Filters.from_update({"risk_threshold": threshold, "alert_types": types})
    assert Subscription(filters=filters).matches(build_alert(a), None) is reference(a, s, None)


@settings(max_examples=500)
@given(alerts, tokens, st.lists(group_texts, max_size=3))
def test_token_bound_and_groups_equal_the_reference(
    a: dict[str, Any], token: list[str] | None, groups: list[str]
) -> None:
    s = {"groups": groups, "types": None, "risk_threshold": None, "location": None}
    claims = None if token is None else tuple(token)
    subscription = Subscription(groups=frozenset(parse_group(g) for g in groups))
    assert subscription.matches(build_alert(a), claims) is reference(a, s, token)


@settings(max_examples=300)
@given(st.lists(group_texts, max_size=6), tokens)
def test_authorize_matches_the_reference(groups: list[str], token: list[str] | None) -> None:
    allowed, denied = authorize(
        [parse_group(g) for g in groups], None if token is None else tuple(token)
    )
    for g in dict.fromkeys(groups):
        kind, value = g.split(":", 1)
        ok = kind != "region" or token is None or any(ref_within(r, value) for r in token)
        assert parse_group(g) in (allowed if ok else denied)
    assert len(allowed) + len(denied) == len(set(groups))


@given(group_texts)
def test_group_text_round_trips(text: str) -> None:
    group = parse_group(text)
    assert str(group) == text
    assert parse_group(str(group)) == group
    assert Group.model_validate(text) == group
    assert json.loads(Subscription(groups=frozenset({group})).to_json())["groups"] == [text]


@given(st.text(max_size=20))
def test_any_text_parses_to_a_round_tripping_group_or_fails_naming_itself(text: str) -> None:
    try:
        group = parse_group(text)
    except ValueError as exc:
        assert repr(text) in str(exc)
    else:
        assert str(group) == text
