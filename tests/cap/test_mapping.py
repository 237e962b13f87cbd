"""CAP 1.2 in and out without NATS: the appendix-shaped and health fixtures, the tables,
several info blocks and areas, the errors, and hypothesis round-trips of the mapping."""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tocsin.cap import CapError, CapMeta, CapRules, parse_cap, parse_type_rules, to_alert, to_cap
from tocsin.cap.mapping import derive_alert_id
from tocsin.cap.schema import check_cap
from tocsin.ingest.pipeline import CapAlert, Reason, Rejection, validate_any, validate_cap
from tocsin.schemas import Alert, AlertLevel, MsgType, Priority

DATA = Path(__file__).with_name("data")
RULES = CapRules(
    parse_type_rules(
        [
            "Met/SEVERE THUNDERSTORM=storm",
            "Met=weather",
            "Geo=earthquake",
            "Rescue=public_safety",
            "Security=public_safety",
            "Health=outbreak_risk",
        ]
    ),
    ("en",),
    "tocsin",
)
ACCEPTED = frozenset(
    {"outbreak_risk", "storm", "weather", "earthquake", "public_safety", "system_health"}
)


def fixture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def mapped(name: str, rules: CapRules = RULES) -> tuple[Alert, CapMeta]:
    return to_alert(parse_cap(fixture(name)), rules)


# --- the fixtures in ---------------------------------------------------------------------
def test_homeland_security_advisory() -> None:
    alert, meta = mapped("homeland_security.xml")
    assert alert.alert_id == derive_alert_id("hsas@dhs.gov", "43b080713727", "tocsin")
    assert alert.alert_type == "public_safety"
    assert (alert.alert_level, alert.priority) == (AlertLevel.HIGH, Priority.URGENT)
    assert alert.title == "Homeland Security Sets Code ORANGE"
    assert alert.message.startswith("The Department of Homeland Security has elevated")
    assert "\n\nA High Condition is declared" in alert.message  # description, then instruction
    assert alert.action_url == "http://www.dhs.gov/dhspublic/display?theme=29"
    assert alert.location.region == "US" and alert.location.lat is None
    assert alert.created_at == datetime(2003, 4, 2, 19, 39, 1, tzinfo=UTC)
    assert alert.confidence_score == 0.8  # Likely
    assert meta.sender_name == "U.S. Government, Department of Homeland Security"


def test_thunderstorm_warning_category_and_event_rule_and_polygon_centroid() -> None:
    alert, meta = mapped("thunderstorm.xml")
    assert alert.alert_type == "storm"  # Met/SEVERE THUNDERSTORM before Met
    assert (alert.alert_level, alert.priority) == (AlertLevel.HIGH, Priority.URGENT)
    assert alert.action_required  # responseType Shelter
    assert alert.location.region == "US-CA"
    # The polygon's closing vertex repeats the first: the centroid of the four others.
    assert alert.location.lat == pytest.approx((38.47 + 38.34 + 38.52 + 38.62) / 4)
    assert alert.location.lon == pytest.approx((-120.14 - 119.95 - 119.74 - 119.89) / 4)
    assert alert.expiry_time == datetime(2099, 6, 17, 23, 0, tzinfo=UTC)
    assert alert.confidence_score == 1.0 and meta.certainty == "Observed"


def test_earthquake_update_references_the_first_report() -> None:
    first, _ = mapped("earthquake_first.xml")
    update, meta = mapped("earthquake_update.xml")
    assert update.msg_type is MsgType.UPDATE
    assert update.references == (first.alert_id,)
    assert meta.references == ("trinet@caltech.edu,TRI13970876.1,2003-06-11T20:30:00-07:00",)
    assert (update.alert_level, update.priority) == (AlertLevel.LOW, Priority.LOW)
    assert (update.location.lat, update.location.lon) == (32.9525, -115.5527)  # the circle


def test_amber_alert() -> None:
    alert, _ = mapped("amber.xml")
    assert (
        alert.alert_type == "public_safety" and alert.title == "Amber Alert in Los Angeles County"
    )
    assert alert.location.region == "US-CA"  # the ISO code, not the SAME one
    assert not alert.action_required


def test_health_alert_takes_the_preferred_language_and_its_area() -> None:
    alert, meta = mapped("health_cholera.xml")
    assert alert.title == "Cholera outbreak risk in Homa Bay" and meta.language == "en-KE"
    assert alert.message == (
        "Cholera cases have been confirmed in Homa Bay town.\n\nBoil or treat drinking water. "
        "Report acute watery diarrhoea to the nearest facility."
    )
    assert (alert.location.region, alert.location.lat, alert.location.lon) == (
        "KE-30",
        -0.5273,
        34.4571,
    )
    assert meta.dropped == ("info: 1 more block(s)",)
    swahili, meta_sw = mapped("health_cholera.xml", CapRules(RULES.types, ("sw", "en")))
    assert swahili.title == "Hatari ya kipindupindu Homa Bay" and meta_sw.language == "sw-KE"
    first, _ = mapped("health_cholera.xml", CapRules(RULES.types, ("fr",)))
    assert first.title == swahili.title  # no block in a wanted language: the first one


def test_health_update_and_cancel() -> None:
    alert, _ = mapped("health_cholera.xml")
    update, _ = mapped("health_cholera_update.xml")
    cancel, _ = mapped("health_cholera_cancel.xml")
    assert update.msg_type is MsgType.UPDATE and update.references == (alert.alert_id,)
    assert update.alert_level is AlertLevel.CRITICAL  # Extreme, but Expected: not emergency
    assert cancel.msg_type is MsgType.CANCEL
    assert cancel.references == (alert.alert_id, update.alert_id)


def test_level_table_emergency_needs_extreme_immediate_and_likely() -> None:
    raw = fixture("health_cholera.xml").replace(b"Expected", b"Immediate")
    raw = raw.replace(b"<severity>Severe", b"<severity>Extreme")
    alert, _ = to_alert(parse_cap(raw), RULES)
    assert (alert.alert_level, alert.priority) == (AlertLevel.EMERGENCY, Priority.EMERGENCY)
    possible = raw.replace(b"<certainty>Likely", b"<certainty>Possible")
    alert, _ = to_alert(parse_cap(possible), RULES)
    assert (alert.alert_level, alert.priority) == (AlertLevel.CRITICAL, Priority.URGENT)


def test_exercise_is_held_and_draft_refused() -> None:
    held = validate_cap(fixture("health_exercise.xml"), ACCEPTED, RULES)
    assert isinstance(held, CapAlert) and held.held and held.meta.status == "Exercise"
    draft = fixture("health_cholera.xml").replace(b"<status>Actual", b"<status>Draft")
    refused = validate_cap(draft, ACCEPTED, RULES)
    assert isinstance(refused, Rejection) and refused.errors[0]["field"] == "status"


# --- several areas -------------------------------------------------------------------------
AREA = (
    b"<area><areaDesc>%s</areaDesc><geocode><valueName>ISO3166-2</valueName>"
    b"<value>%s</value></geocode></area>"
)


def with_areas(*codes: bytes) -> bytes:
    raw = fixture("amber.xml")
    start, end = raw.index(b"<area>"), raw.index(b"</area>") + len(b"</area>")
    return raw[:start] + b"".join(AREA % (c, c) for c in codes) + raw[end:]


def test_areas_in_one_country_give_their_common_region() -> None:
    alert, _ = to_alert(parse_cap(with_areas(b"KE-30", b"KE-31")), RULES)
    assert alert.location.region == "KE"
    alert, _ = to_alert(parse_cap(with_areas(b"KE-30", b"KE-30")), RULES)
    assert alert.location.region == "KE-30"


def test_areas_in_several_countries_are_refused_naming_them() -> None:
    with pytest.raises(CapError) as err:
        to_alert(parse_cap(with_areas(b"KE-30", b"UG-102")), RULES)
    assert err.value.field == "info.area.geocode" and "KE, UG" in err.value.message


# --- errors name the CAP element ------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ((b"<value>US-CA</value>", b"<value>California</value>"), "info.area.geocode"),
        ((b"ISO3166-2", b"FIPS6"), "info.area.geocode"),
        ((b"<category>Rescue</category>", b"<category>Fire</category>"), "info.category"),
        ((b"<urgency>Immediate</urgency>", b"<urgency>Soon</urgency>"), "info.urgency"),
        ((b"<msgType>Alert</msgType>", b"<msgType>Ack</msgType>"), "msgType"),
        ((b"<msgType>Alert</msgType>", b"<msgType>Update</msgType>"), "references"),
        ((b"<sent>2003-06-11T22:39:00-07:00", b"<sent>2003-06-11T22:39:00Z"), "sent"),
    ],
)
def test_bad_cap_names_the_element(edit: tuple[bytes, bytes], field: str) -> None:
    raw = fixture("amber.xml").replace(*edit)
    result = validate_cap(raw, ACCEPTED, RULES)
    assert isinstance(result, Rejection), result
    assert result.reason is (
        Reason.UNKNOWN_TYPE if field == "info.category" else Reason.INVALID_CAP
    )
    assert result.errors[0]["field"] == field, result.errors


def test_expired_cap_is_refused_like_any_alert() -> None:
    raw = fixture("thunderstorm.xml").replace(b"2099-06-17", b"2003-06-17")
    result = validate_cap(raw, ACCEPTED, RULES)
    assert isinstance(result, Rejection) and result.reason is Reason.EXPIRED


def test_content_decides_json_or_cap_on_the_ingest_subject() -> None:
    assert isinstance(validate_any(fixture("amber.xml"), ACCEPTED, RULES), CapAlert)
    bare = fixture("amber.xml").split(b"?>", 1)[1]  # no XML declaration: whitespace may lead
    assert isinstance(validate_any(b"\n  " + bare, ACCEPTED, RULES), CapAlert)
    assert isinstance(validate_any(b'{"alert_id": 1}', ACCEPTED, RULES), Rejection)


# --- CAP out: valid, and the same alert back ------------------------------------------------
FIXTURES = sorted(p.name for p in DATA.glob("*.xml"))


@pytest.mark.parametrize("name", FIXTURES)
def test_every_fixture_round_trips_through_tocsin_cap(name: str) -> None:
    alert, meta = mapped(name)
    out = to_cap(alert, meta, RULES)
    root = parse_cap(out)  # valid against the schema (parse_cap checks it)
    again, meta_again = to_alert(root, RULES)
    assert again == alert
    assert meta_again == meta


@pytest.mark.parametrize("name", FIXTURES)
def test_alert_without_cap_details_emits_valid_cap_mapping_back(name: str) -> None:
    alert, _ = mapped(name)
    root = parse_cap(to_cap(alert, None, RULES))
    again, meta = to_alert(root, RULES)
    assert again == alert  # tocsin's sender keeps the alert_id; tocsin:* parameters the rest
    assert meta.sender == "tocsin" and meta.identifier == str(alert.alert_id)


# --- hypothesis ----------------------------------------------------------------------------
TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=300,
).filter(lambda t: t.strip() == t and t != "")
IDS = st.text(alphabet=string.ascii_letters + string.digits + ".-_:@", min_size=1, max_size=40)
REGIONS = st.sampled_from(["KE", "KE-30", "UG-102", "US-CA", "TZ", "RW-1"])
WHOLE_SECONDS = st.datetimes(
    min_value=datetime(2030, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))


URGENCIES = ["Immediate", "Expected", "Future", "Past", "Unknown"]
SEVERITIES = ["Extreme", "Severe", "Moderate", "Minor", "Unknown"]
CERTAINTIES = ["Observed", "Likely", "Possible", "Unlikely", "Unknown"]


@st.composite
def cap_documents(draw: st.DrawFn) -> bytes:
    sender, identifier = draw(IDS), draw(IDS)
    msg_type = draw(st.sampled_from(["Alert", "Update", "Cancel"]))
    sent = draw(WHOLE_SECONDS)
    refs = ""
    if msg_type != "Alert":
        n = draw(st.integers(1, 3))
        refs = " ".join(f"{sender},{identifier}-r{i},{sent.isoformat()}" for i in range(n))
        refs = f"<references>{refs}</references>"
    esc = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}

    def x(text: str) -> str:
        return "".join(esc.get(c, c) for c in text)

    infos = []
    for _ in range(draw(st.integers(1, 3))):
        lang = draw(st.sampled_from(["en-US", "fr-FR", "sw-KE", "en-GB"]))
        shape = draw(st.sampled_from(["", "circle", "polygon"]))
        lat, lon = draw(st.floats(-80, 80)), draw(st.floats(-170, 170))
        geo = {
            "": "",
            "circle": f"<circle>{lat!r},{lon!r} 5</circle>",
            "polygon": f"<polygon>{lat!r},{lon!r} {lat + 1!r},{lon!r} "
            f"{lat!r},{lon + 1!r} {lat!r},{lon!r}</polygon>",
        }[shape]
        instruction = draw(st.none() | TEXT)
        infos.append(
            f"<info><language>{lang}</language><category>"
            f"{draw(st.sampled_from(['Health', 'Met', 'Geo']))}</category>"
            f"<event>{x(draw(TEXT))}</event>"
            + "".join(
                f"<responseType>{r}</responseType>"
                for r in draw(st.lists(st.sampled_from(["Shelter", "Monitor", "None"]), max_size=2))
            )
            + f"<urgency>{draw(st.sampled_from(URGENCIES))}</urgency>"
            f"<severity>{draw(st.sampled_from(SEVERITIES))}</severity>"
            f"<certainty>{draw(st.sampled_from(CERTAINTIES))}</certainty>"
            f"<expires>{draw(WHOLE_SECONDS).isoformat()}</expires>"
            f"<headline>{x(draw(TEXT))}</headline><description>{x(draw(TEXT))}</description>"
            + (f"<instruction>{x(instruction)}</instruction>" if instruction else "")
            + f"<area><areaDesc>{x(draw(TEXT))}</areaDesc>{geo}<geocode><valueName>ISO3166-2"
            f"</valueName><value>{draw(REGIONS)}</value></geocode></area></info>"
        )
    return (
        '<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">'
        f"<identifier>{identifier}</identifier><sender>{sender}</sender>"
        f"<sent>{sent.isoformat()}</sent><status>Actual</status><msgType>{msg_type}</msgType>"
        f"<scope>Public</scope>{refs}{''.join(infos)}</alert>"
    ).encode()


HYPO_RULES = CapRules(
    parse_type_rules(["Health=outbreak_risk", "Met=weather", "Geo=earthquake"]), ("en",)
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap_documents())
def test_cap_in_out_in_is_a_fixed_point(raw: bytes) -> None:
    alert, meta = to_alert(parse_cap(raw), HYPO_RULES)
    out = to_cap(alert, meta, HYPO_RULES)
    again, meta_again = to_alert(parse_cap(out), HYPO_RULES)
    assert (again, meta_again) == (alert, meta)


ALERT_IDS = st.integers(1, 2**53 - 1) | st.from_regex(
    r"[A-Za-z0-9][A-Za-z0-9._:-]{0,40}", fullmatch=True
)


@st.composite
def alerts(draw: st.DrawFn) -> Alert:
    msg_type = draw(st.sampled_from(list(MsgType)))
    alert_id = draw(ALERT_IDS)
    refs = (
        draw(st.lists(ALERT_IDS.filter(lambda r: str(r) != str(alert_id)), min_size=1, max_size=3))
        if msg_type is not MsgType.ALERT
        else []
    )
    point = draw(st.booleans())
    body = {
        "alert_id": alert_id,
        "alert_level": draw(st.sampled_from(list(AlertLevel))).value,
        "alert_type": draw(st.sampled_from(["outbreak_risk", "weather", "earthquake"])),
        "title": draw(TEXT.filter(lambda t: len(t) <= 200)),
        "message": draw(TEXT),
        "priority": draw(st.sampled_from(list(Priority))).value,
        "location": {"region": draw(REGIONS)}
        | ({"lat": draw(st.floats(-90, 90)), "lon": draw(st.floats(-180, 180))} if point else {}),
        "risk_score": draw(st.none() | st.floats(0, 1)),
        "confidence_score": draw(st.none() | st.floats(0, 1)),
        "affected_population": draw(st.none() | st.integers(0, 10**9)),
        "action_required": draw(st.booleans()),
        "action_url": draw(st.none() | st.just("https://example.org/a/1")),
        "created_at": draw(WHOLE_SECONDS),
        "expiry_time": draw(st.none() | WHOLE_SECONDS),
        "msg_type": msg_type.value,
        "references": refs,
    }
    return Alert.model_validate(body)


@settings(max_examples=150, deadline=None)
@given(alerts())
def test_any_alert_emits_valid_cap_that_maps_back_to_it(alert: Alert) -> None:
    out = to_cap(alert, None, HYPO_RULES)
    check_cap(parse_cap(out))  # schema-valid
    again, _ = to_alert(parse_cap(out), HYPO_RULES)
    # CAP carries ids as text: an integer id comes back as its decimal string (the same
    # alert), and references as a set of them.
    expected = alert.model_copy(update={"references": alert.referenced_ids})
    assert again.model_copy(update={"alert_id": alert.alert_id}) == expected
    assert str(again.alert_id) == str(alert.alert_id)


def test_cap_times_are_written_with_an_explicit_offset() -> None:
    alert, _ = mapped("amber.xml")
    later = alert.model_copy(update={"expiry_time": datetime.now(UTC) + timedelta(days=1)})
    out = to_cap(later, None, RULES).decode()
    assert "-00:00</expires>" in out and "Z<" not in out
