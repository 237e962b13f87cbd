"""The durable's subject filters: a superset of the subscription, never overlapping, bounded."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tocsin.core.coarse import MAX_SUBJECTS, coarse_filters
from tocsin.core.naming import Names, matches
from tocsin.schemas import Alert
from tocsin.schemas.subscription import Filters, Subscription, parse_group

NAMES = Names("t")
LEVELS = ["low", "medium", "high", "critical", "emergency"]
PRIORITIES = ["low", "normal", "high", "urgent", "emergency"]
TYPES = ["outbreak_risk", "flood", "data_quality"]
REGIONS = ["KE", "KE-3", "KE-30", "UG", "UG-102", "FJ", "FJ-C"]


def sub(*groups: str, **filters: Any) -> Subscription:
    return Subscription(
        groups=frozenset(parse_group(g) for g in groups), filters=Filters.from_update(filters)
    )


def subject_of(a: Alert) -> str:
    return NAMES.alert_subject(a.location.region, a.alert_level.value, a.alert_type)


def overlap(p: str, q: str) -> bool:
    """Could one subject match both filters? (Alert subjects have five tokens.)"""
    a, b = p.split("."), q.split(".")
    for x, y in itertools.zip_longest(a, b):
        if x == ">" or y == ">":
            return True
        if x is None or y is None:
            return False
        if x != y and "*" not in (x, y):
            return False
    return True


def test_examples_read_as_an_operator_would_write_them() -> None:
    assert coarse_filters(NAMES, sub(), ("KE",)) == ["t.alerts.KE.>"]
    assert coarse_filters(NAMES, sub(), None) == ["t.alerts.>"]
    assert coarse_filters(NAMES, sub("region:KE-30"), ("KE", "UG")) == ["t.alerts.KE.KE-30.>"]
    assert coarse_filters(NAMES, sub("level:critical"), ("KE",)) == [
        "t.alerts.KE.*.critical.>",
        "t.alerts.KE.*.emergency.>",
    ]
    assert coarse_filters(NAMES, sub(alert_types=["flood"]), ("UG-102",)) == [
        "t.alerts.UG.UG-102.*.flood"
    ]
    # regions narrow on the subject only without bbox/near: a point may decide instead
    assert coarse_filters(NAMES, sub(location_filter={"regions": ["KE-30"]}), ("KE",)) == [
        "t.alerts.KE.KE-30.>"
    ]
    near = {"near": {"lat": 0, "lon": 35, "radius_km": 5}, "regions": ["KE-30"]}
    assert coarse_filters(NAMES, sub(location_filter=near), ("KE",)) == ["t.alerts.KE.>"]
    # priority is not in the subject
    assert coarse_filters(NAMES, sub("priority:urgent"), ("KE",)) == ["t.alerts.KE.>"]


def test_a_subscription_that_can_match_nothing_gets_a_filter_that_matches_nothing() -> None:
    # an empty filter list would mean "every subject" to JetStream
    assert coarse_filters(NAMES, sub(location_filter={"regions": ["UG"]}), ("KE",)) == [
        "t.alerts.NONE"
    ]
    assert coarse_filters(NAMES, sub("type:flood", alert_types=["outbreak_risk"]), None) == [
        "t.alerts.NONE"
    ]


def test_whole_codes_not_string_prefixes() -> None:
    assert coarse_filters(NAMES, sub("region:KE-3"), ("KE",)) == ["t.alerts.KE.KE-3.>"]
    assert not matches(
        NAMES.alert_subject("KE-30", "high", "flood"),
        coarse_filters(NAMES, sub("region:KE-3"), None)[0],
    )


def test_many_groups_widen_types_then_levels_but_stay_a_superset() -> None:
    types = [f"type_{i}" for i in range(40)]
    regions = [f"KE-{i}" for i in range(10)]
    s = sub(*(f"type:{t}" for t in types), alert_types=types)
    got = coarse_filters(NAMES, s, tuple(regions))
    assert len(got) <= MAX_SUBJECTS
    assert got == [f"t.alerts.KE.{r}.>" for r in sorted(regions)]


alerts = st.builds(
    lambda r, lv, p, t: Alert.model_validate(
        {
            "alert_id": 1,
            "alert_level": lv,
            "alert_type": t,
            "title": "t",
            "message": "m",
            "priority": p,
            "location": {"region": r},
            "risk_score": 0.5,
        }
    ),
    st.sampled_from(REGIONS),
    st.sampled_from(LEVELS),
    st.sampled_from(PRIORITIES),
    st.sampled_from(TYPES),
)
groups = st.one_of(
    st.sampled_from(REGIONS).map("region:{}".format),
    st.sampled_from(LEVELS).map("level:{}".format),
    st.sampled_from(PRIORITIES).map("priority:{}".format),
    st.sampled_from(TYPES).map("type:{}".format),
)
filters = st.fixed_dictionaries(
    {},
    optional={
        "alert_types": st.lists(st.sampled_from(TYPES), min_size=1, max_size=3),
        "location_filter": st.one_of(
            st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3).map(
                lambda r: {"regions": r}
            ),
            st.just({"bbox": [-180, -90, 180, 90]}),
            st.just({"bbox": [0, -10, 40, 10], "regions": ["UG"]}),
        ),
    },
)
tokens = st.none() | st.lists(st.sampled_from(REGIONS), min_size=1, max_size=3).map(tuple)


@settings(max_examples=400)
@given(st.lists(groups, max_size=6), filters, tokens, st.lists(alerts, min_size=1, max_size=8))
def test_filters_hold_every_match_never_overlap_and_stay_bounded(
    group_texts: list[str],
    filter_spec: dict[str, Any],
    token: tuple[str, ...] | None,
    batch: list[Alert],
) -> None:
    s = sub(*group_texts, **filter_spec)
    got = coarse_filters(NAMES, s, token)
    assert got and len(got) <= MAX_SUBJECTS
    assert got == sorted(set(got))
    for p, q in itertools.combinations(got, 2):
        assert not overlap(p, q), (p, q)  # JetStream refuses overlapping filters (10138)
    for a in batch:
        if s.matches(a, token):
            assert any(matches(subject_of(a), f) for f in got), (subject_of(a), got)


@pytest.mark.parametrize(
    ("p", "q", "expected"),
    [
        ("t.alerts.KE.>", "t.alerts.KE.KE-30.>", True),
        ("t.alerts.KE.KE-3.>", "t.alerts.KE.KE-30.>", False),
        ("t.alerts.*.*.high.>", "t.alerts.KE.*.low.>", False),
        ("t.alerts.*.*.high.>", "t.alerts.KE.>", True),
        ("t.alerts.NONE", "t.alerts.KE.>", False),
    ],
)
def test_the_overlap_check_itself(p: str, q: str, expected: bool) -> None:
    assert overlap(p, q) is expected
