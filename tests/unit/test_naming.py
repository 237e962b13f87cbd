"""Names: streams, subjects, region filters, device consumers and subject matching."""

from __future__ import annotations

import re

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tocsin.core.naming import Names, matches
from tocsin.schemas.alert import is_region, region_contains

NAMES = Names()

# Small alphabets make shared prefixes (KE-3 / KE-30 / KE-300) and equal codes likely.
COUNTRIES = st.sampled_from(["KE", "UG", "TZ", "KA", "EK"])
SUBDIVISIONS = st.text(alphabet="0123A", min_size=1, max_size=3)


@st.composite
def region_codes(draw: st.DrawFn) -> str:
    country = draw(COUNTRIES)
    if draw(st.booleans()):
        return country
    return f"{country}-{draw(SUBDIVISIONS)}"


@st.composite
def region_and_prefix(draw: st.DrawFn) -> tuple[str, str]:
    """A region and a prefix that contains it often, shares a string prefix sometimes."""
    region = draw(region_codes())
    related = [region, region[:2]]
    if is_region(region[:-1]):
        related.append(region[:-1])  # KE-30 -> KE-3: a string prefix only
    prefix = draw(st.one_of(st.sampled_from(related), region_codes()))
    return region, prefix


LEVELS = st.sampled_from(["low", "medium", "high", "critical", "emergency"])
TYPES = st.sampled_from(["outbreak_risk", "system_health", "data_quality"])

# ------------------------------------------------------------------------ streams/subjects


def test_default_names() -> None:
    assert NAMES.ingest_stream == "INGEST"
    assert NAMES.alerts_stream == "ALERTS"
    assert NAMES.dlq_stream == "INGEST_DLQ"
    assert NAMES.ingest_subject == "ingest.alerts"  # CONTRACT §5
    assert NAMES.alerts_all == "alerts.>"
    assert NAMES.dlq_all == "ingest.dlq.>"
    assert NAMES.dlq_subject("expired") == "ingest.dlq.expired"
    assert NAMES.ingest_consumer == "ingest"


def test_namespaced_names() -> None:
    names = Names("t1a")
    assert names.ingest_stream == "T1A_INGEST"
    assert names.alerts_stream == "T1A_ALERTS"
    assert names.dlq_stream == "T1A_INGEST_DLQ"
    assert names.ingest_subject == "t1a.ingest.alerts"
    assert names.alerts_all == "t1a.alerts.>"
    assert names.dlq_all == "t1a.ingest.dlq.>"
    assert names.dlq_subject("too_large") == "t1a.ingest.dlq.too_large"
    assert names.alert_subject("KE-30", "high", "outbreak_risk") == (
        "t1a.alerts.KE.KE-30.high.outbreak_risk"
    )
    assert names.region_filters(["KE"]) == ["t1a.alerts.KE.>"]
    assert names.region_filters(None) == ["t1a.alerts.>"]
    assert names.gateway_takeover_subject("0a1b") == "t1a.tocsin.gateway.0a1b.takeover"
    assert names.legacy_takeover_subject("dev__a__b") == "t1a.tocsin.device.dev__a__b.takeover"


def test_namespaces_do_not_share_names() -> None:
    a, b = Names("ta"), Names("tb")
    assert a.alerts_stream != b.alerts_stream
    assert not matches(a.alert_subject("KE", "low", "x"), b.alerts_all)
    assert matches(a.alert_subject("KE", "low", "x"), a.alerts_all)


def test_alert_subject_layout() -> None:
    assert NAMES.alert_subject("KE-30", "high", "outbreak_risk") == (
        "alerts.KE.KE-30.high.outbreak_risk"
    )
    assert NAMES.alert_subject("UG-102", "low", "data_quality") == (
        "alerts.UG.UG-102.low.data_quality"
    )


def test_country_alert_uses_country_as_region() -> None:
    assert NAMES.alert_subject("KE", "emergency", "outbreak_risk") == (
        "alerts.KE.KE.emergency.outbreak_risk"
    )


@pytest.mark.parametrize("bad", ["ke", "KEN", "KE-", "KE-3000", "K", "", "KE.30", "KE-3*", "KE->"])
def test_alert_subject_rejects_bad_region(bad: str) -> None:
    with pytest.raises(ValueError, match="region"):
        NAMES.alert_subject(bad, "high", "outbreak_risk")


@given(region_codes(), LEVELS, TYPES, st.sampled_from(["", "t1", "ns-x"]))
def test_parse_alert_subject_round_trips(region: str, level: str, kind: str, ns: str) -> None:
    names = Names(ns)
    assert names.parse_alert_subject(names.alert_subject(region, level, kind)) == (
        region,
        level,
        kind,
    )


# ------------------------------------------------------------------------ region filters


def test_region_filters_none_is_everything() -> None:
    assert NAMES.region_filters(None) == ["alerts.>"]


def test_region_filters_empty_is_nothing() -> None:
    assert NAMES.region_filters([]) == []


def test_region_filters_country_and_subdivision() -> None:
    assert NAMES.region_filters(["KE"]) == ["alerts.KE.>"]
    assert NAMES.region_filters(["UG-102"]) == ["alerts.UG.UG-102.>"]


def test_region_filters_collapse_contained() -> None:
    assert NAMES.region_filters(["KE-30", "KE", "KE-1"]) == ["alerts.KE.>"]
    assert NAMES.region_filters(["KE-30", "KE-30"]) == ["alerts.KE.KE-30.>"]


def test_region_filters_string_prefix_is_not_containment() -> None:
    assert sorted(NAMES.region_filters(["KE-3", "KE-30"])) == [
        "alerts.KE.KE-3.>",
        "alerts.KE.KE-30.>",
    ]
    assert not matches(NAMES.alert_subject("KE-30", "high", "x"), "alerts.KE.KE-3.>")


def test_region_filters_keep_other_countries() -> None:
    assert sorted(NAMES.region_filters(["UG", "KE-30", "UG-102"])) == [
        "alerts.KE.KE-30.>",
        "alerts.UG.>",
    ]


@pytest.mark.parametrize("bad", ["ke", "KEN", "UGA", "KE-", "KE-3000", "", "KE.30", ">", "*"])
def test_region_filters_reject_bad_code(bad: str) -> None:
    with pytest.raises(ValueError, match="region"):
        NAMES.region_filters([bad])


@pytest.mark.parametrize("bad", ["KE-bad", "KE-3.>"])
def test_region_filters_reject_bad_code_next_to_its_country(bad: str) -> None:
    """A bad code is an error even when a valid code in the same list would cover it."""
    with pytest.raises(ValueError, match="region"):
        NAMES.region_filters(["KE", bad])


@given(region_and_prefix(), LEVELS, TYPES)
def test_server_filter_equals_region_rule(pair: tuple[str, str], level: str, kind: str) -> None:
    """The key property: the JetStream filter of a prefix selects exactly its regions."""
    region, prefix = pair
    subject = NAMES.alert_subject(region, level, kind)
    selected = any(matches(subject, f) for f in NAMES.region_filters([prefix]))
    assert selected == region_contains(prefix, region)


@given(st.lists(region_codes(), min_size=1, max_size=6), region_codes(), LEVELS, TYPES)
def test_filters_of_many_prefixes_select_their_union_without_overlap(
    prefixes: list[str], region: str, level: str, kind: str
) -> None:
    subject = NAMES.alert_subject(region, level, kind)
    hits = [f for f in NAMES.region_filters(prefixes) if matches(subject, f)]
    assert len(hits) <= 1, f"overlapping filters {hits}: JetStream rejects them"
    assert bool(hits) == any(region_contains(p, region) for p in prefixes)


@given(st.lists(region_codes(), min_size=1, max_size=6))
def test_region_filters_are_distinct_and_minimal(prefixes: list[str]) -> None:
    filters = NAMES.region_filters(prefixes)
    assert len(filters) == len(set(filters))
    kept = [f.removeprefix("alerts.").removesuffix(".>").split(".")[-1] for f in filters]
    for a in kept:
        assert a in prefixes
        for b in kept:
            assert a == b or not region_contains(a, b)


# ------------------------------------------------------------------------ device consumers

#: NATS refuses these in stream and consumer names.
_FORBIDDEN = re.compile(r"[.*>/\\\s]")
#: nats-server's JSMaxNameLen.
NATS_MAX_NAME_LEN = 255
#: A tocsin client_id (the gateway's handshake rule): 1-64 of A-Z a-z 0-9 . _ : @ -
CLIENT_IDS = st.from_regex(r"\A[A-Za-z0-9._:@-]{1,64}\Z")

#: Fragments that look like escapes and separators, so collisions would be found if possible.
TRICKY = st.lists(
    st.sampled_from(["a", "_", "__", "2e", "5f", "_2e", ".", "-", "é", " ", "*", ">", "/", "\\"]),
    max_size=5,
).map("".join)


def _assert_valid_consumer_name(name: str) -> None:
    assert name
    assert not _FORBIDDEN.search(name), name
    assert name.isascii() and name.isprintable(), name


def test_device_consumer_examples() -> None:
    assert NAMES.device_consumer("alice", "phone") == "dev__alice__phone"
    assert NAMES.device_consumer("a.b", "c d") == "dev__a_2eb__c_20d"
    assert Names.parse_device_consumer("dev__alice__phone") == ("alice", "phone")


@pytest.mark.parametrize("name", ["dev__a", "feed__x", "dev__a__b__c", "x__a__b", ""])
def test_parse_device_consumer_refuses_other_names(name: str) -> None:
    assert Names.parse_device_consumer(name) is None


def _check_round_trip(user: str, client: str) -> None:
    name = NAMES.device_consumer(user, client)
    _assert_valid_consumer_name(name)
    if name.startswith("devh__"):  # over NATS's length limit: hashed, named by metadata
        assert Names.parse_device_consumer(name) is None
    else:
        assert Names.parse_device_consumer(name) == (user, client)


@given(st.text(), st.text())
def test_device_consumer_round_trips(user: str, client: str) -> None:
    _check_round_trip(user, client)


@given(TRICKY, TRICKY)
def test_device_consumer_round_trips_tricky(user: str, client: str) -> None:
    _check_round_trip(user, client)


@given(st.tuples(TRICKY, TRICKY), st.tuples(TRICKY, TRICKY))
@example(("_2e", "x"), (".", "x"))
@example(("a__b", "c"), ("a", "b__c"))
@example(("a", ""), ("", "a"))
def test_device_consumers_never_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    assume(a != b)
    assert NAMES.device_consumer(*a) != NAMES.device_consumer(*b)


def test_device_consumers_never_collide_examples() -> None:
    pairs = [("a", "b__c"), ("a__b", "c"), ("a_", "b"), ("a", "_b"), ("a.b", "c"), ("a_2eb", "c")]
    names = {NAMES.device_consumer(u, c) for u, c in pairs}
    assert len(names) == len(pairs)


@given(st.text(min_size=1, max_size=128), CLIENT_IDS)
@example("a" * 128, "." * 64)  # 327 characters
@example("é" * 128, "phone")  # 780 characters
@example("auth0|" + "0" * 24, "phone")  # a common IdP sub: fits
def test_device_consumer_names_fit_nats_limit(user: str, client: str) -> None:
    """Any token sub (1-128 characters) and handshake client_id gives a name NATS accepts."""
    name = NAMES.device_consumer(user, client)
    assert len(name) <= NATS_MAX_NAME_LEN, f"{len(name)} characters: NATS refuses the consumer"


# ------------------------------------------------------------------------ matches()


@pytest.mark.parametrize(
    ("subject", "pattern", "expected"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b.d", False),
        ("a.b.c", "a.*.c", True),
        ("a.b.c", "*.*.*", True),
        ("a.b", "*.*.*", False),
        ("a.b.c.d", "*.*.*", False),
        ("a.b", "a.*", True),
        ("a.b.c", "a.*", False),
        ("a.b.c", "a.>", True),
        ("a.b", "a.>", True),
        ("a", "a.>", False),
        ("a", ">", True),
        ("a.b.c", ">", True),
        ("a.b.c", "*.>", True),
        ("a", "*.>", False),
        ("a.b", "a.b.>", False),
        ("ab.c", "a.>", False),
        ("a.bc", "a.b", False),
        ("a.b", "a.bc", False),
        ("a.b", "a", False),
        ("a", "a.b", False),
        ("alerts.KE.KE-30.high.x", "alerts.KE.>", True),
        ("alerts.KE.KE-30.high.x", "alerts.KE.KE-3.>", False),
        ("alerts.KE.KE-30.high.x", "alerts.*.*.high.*", True),
    ],
)
def test_matches_reference(subject: str, pattern: str, expected: bool) -> None:
    assert matches(subject, pattern) is expected


def _reference(subject: str, pattern: str) -> bool:
    """NATS wildcards as a regular expression, independently of the code under test."""
    parts = []
    for token in pattern.split("."):
        if token == "*":
            parts.append(r"[^.]+")
        elif token == ">":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        else:
            parts.append(re.escape(token))
    return re.fullmatch(r"\.".join(parts), subject) is not None


TOKENS = st.sampled_from(["a", "b", "KE", "KE-3"])
SUBJECTS = st.lists(TOKENS, min_size=1, max_size=5).map(".".join)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(st.one_of(TOKENS, st.just("*")), min_size=0, max_size=5))
    if not tokens or draw(st.booleans()):
        tokens.append(">")
    return ".".join(tokens)


@given(SUBJECTS, patterns())
def test_matches_agrees_with_reference(subject: str, pattern: str) -> None:
    assert matches(subject, pattern) == _reference(subject, pattern)


@given(st.lists(TOKENS, min_size=1, max_size=6), st.data())
def test_wildcarded_subject_matches_itself(tokens: list[str], data: st.DataObject) -> None:
    stars = data.draw(st.lists(st.booleans(), min_size=len(tokens), max_size=len(tokens)))
    pattern = [("*" if star else t) for t, star in zip(tokens, stars, strict=True)]
    cut = data.draw(st.integers(0, len(tokens) - 1))
    subject = ".".join(tokens)
    assert matches(subject, ".".join(pattern))
    assert matches(subject, ".".join([*pattern[:cut], ">"]))
    assert not matches(subject, ".".join([*pattern, ">"]))
    assert not matches(subject, ".".join([*pattern, "*"]))


@pytest.mark.parametrize("namespace", ["", "t1"])
def test_names_streams_are_the_declared_streams(namespace: str) -> None:
    """/readyz checks ``Names.streams``; topology declares ``stream_configs``: the same set."""
    from tocsin.core.settings import Settings
    from tocsin.core.topology import stream_configs

    names = Names(namespace)
    configs = stream_configs(Settings(jwt_secret="x" * 40), names)
    assert tuple(c.name for c in configs) == names.streams
