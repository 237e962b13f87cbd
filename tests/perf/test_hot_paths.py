"""Micro-benchmarks of the hot paths (issue 4): matching, encoding, dispatch, the window.

Each benchmark also checks what the measured call returned, so this is a test suite too.
``pyproject.toml`` gives pytest ``--benchmark-disable``: under ``make test`` (and CI) every
benchmarked call runs once, as a plain test, with no timing and no table. For numbers::

    .venv/bin/python -m pytest tests/perf --benchmark-enable --benchmark-only \\
        --benchmark-columns=min,median,mean,ops,rounds --benchmark-sort=name

(``--benchmark-enable`` overrides the configured ``--benchmark-disable``; add
``--benchmark-autosave`` to keep a run and ``--benchmark-compare`` to diff against the last
saved one, e.g. before and after a change to the hot path.) There are no thresholds: the
numbers are for people and for docs/benchmarks.md, not a pass/fail bar.

What is measured, per call:

* ``alert_frame`` (tocsin's bytes template) against pydantic's and orjson's encodings of
  the same frame, and a ping control frame by pydantic (``send_control``) and orjson;
* ``LiveAlert`` construction (the frame is encoded there, once per alert per gateway);
* ``LiveFeed.dispatch`` of one alert to 1,000 real ``Session`` objects in live mode (the
  country buckets, ``accepts``, ``offer``, the subscription judgement, the window and the
  sender's queue; no sockets), and to 1,000 stub listeners (the fan-out loop alone);
* ``naming.matches``, ``Names.region_filters``, ``Subscription.matches`` over several
  subscriptions, ``coarse_filters``;
* ``Window`` take/ack cycles; ``Alert.model_validate_json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import count
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from tocsin.core.auth import Claims, Role
from tocsin.core.coarse import coarse_filters
from tocsin.core.naming import Names, matches
from tocsin.core.settings import Settings
from tocsin.gateway.device import Device
from tocsin.gateway.live import LiveAlert, LiveFeed, alert_frame
from tocsin.gateway.session import Mode, Session
from tocsin.gateway.window import InFlight, Window
from tocsin.ingest.pipeline import encode_alert
from tocsin.schemas import Alert, AlertFrame, Ping, server_frame_adapter
from tocsin.schemas.subscription import Filters, Subscription

NAMES = Names()
ALERT = Alert.model_validate(
    {
        "alert_id": 1_732_000_000_001,
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "Malaria outbreak risk rising",
        "message": "Risk model predicts a rise in cases over the next two weeks; "
        "distribute bed nets and test suspected cases.",
        "priority": "urgent",
        "location": {"region": "KE-30", "lat": -0.53, "lon": 34.45},
        "risk_score": 0.8,
        "confidence_score": 0.9,
        "affected_population": 120_000,
        "action_required": True,
        "action_url": "https://example.org/alerts/1732000000001",
        "created_at": "2026-11-25T10:00:00Z",
    }
)
DATA = encode_alert(ALERT)  # as stored in ALERTS
SUBJECT = NAMES.alert_subject("KE-30", "high", "outbreak_risk")
SEQ = 123_456
FRAME = alert_frame(SEQ, DATA, False)

# (subscription, does it take ALERT?) — the expectation is written out, not computed
SUBSCRIPTIONS: list[tuple[Subscription, bool]] = [
    (Subscription(), True),
    (Subscription.model_validate({"groups": ["region:KE-30"]}), True),
    (Subscription.model_validate({"groups": ["region:KE-31", "level:critical"]}), False),
    (Subscription.model_validate({"groups": ["priority:urgent"]}), True),
    (Subscription.model_validate({"groups": ["type:data_quality"]}), False),
    (Subscription(filters=Filters(risk_threshold=0.5)), True),
    (Subscription(filters=Filters(risk_threshold=0.9)), False),
    (Subscription(filters=Filters.from_query({"alert_types": "outbreak_risk,data_quality"})), True),
    (
        Subscription(
            filters=Filters.from_query(
                {"location_filter": '{"near": {"lat": -0.1, "lon": 34.75, "radius_km": 80}}'}
            )
        ),
        True,  # Homa Bay is ~57 km from Kisumu
    ),
    (
        Subscription(
            filters=Filters.from_query({"location_filter": '{"bbox": [35.0, -1.5, 36.0, 0.0]}'})
        ),
        False,
    ),
]
# token regions of the listeners, and whether ALERT (KE-30) lies within them
TOKENS: list[tuple[tuple[str, ...] | None, bool]] = [
    (("KE",), True),
    (("KE-30",), True),
    (("KE-31",), False),
    (("UG",), False),
    (("KE", "UG"), True),
    (None, True),  # admin
]


def frame_dict() -> dict[str, Any]:
    return {
        "type": "alert",
        "seq": SEQ,
        "redelivered": False,
        "alert": ALERT.model_dump(mode="json", exclude_none=True),
    }


# ------------------------------------------------------------------ encoding


@pytest.mark.benchmark(group="encode alert frame")
def test_alert_frame_template(benchmark: Any) -> None:
    frame = benchmark(alert_frame, SEQ, DATA, False)
    assert frame == b'{"type":"alert","seq":123456,"redelivered":false,"alert":' + DATA + b"}"
    assert server_frame_adapter.validate_json(frame) == AlertFrame(seq=SEQ, alert=ALERT)


@pytest.mark.benchmark(group="encode alert frame")
def test_alert_frame_pydantic(benchmark: Any) -> None:
    model = AlertFrame(seq=SEQ, alert=ALERT)
    frame = benchmark(lambda: model.model_dump_json(exclude_none=True).encode())
    assert orjson.loads(frame) == orjson.loads(FRAME)


@pytest.mark.benchmark(group="encode alert frame")
def test_alert_frame_orjson(benchmark: Any) -> None:
    d = frame_dict()
    frame = benchmark(orjson.dumps, d)
    assert orjson.loads(frame) == orjson.loads(FRAME)


@pytest.mark.benchmark(group="encode ping frame")
def test_ping_pydantic(benchmark: Any) -> None:
    frame = benchmark(lambda: Ping(ts=1_732_000_000.25).model_dump_json().encode())
    assert frame == b'{"type":"ping","ts":1732000000.25}'


@pytest.mark.benchmark(group="encode ping frame")
def test_ping_orjson(benchmark: Any) -> None:
    frame = benchmark(lambda: orjson.dumps({"type": "ping", "ts": 1_732_000_000.25}))
    assert frame == b'{"type":"ping","ts":1732000000.25}'


@pytest.mark.benchmark(group="live alert")
def test_live_alert_construction(benchmark: Any) -> None:
    live = benchmark(LiveAlert, SEQ, SUBJECT, DATA, None)
    assert live.frame == FRAME and live.subject == SUBJECT


@pytest.mark.benchmark(group="parse")
def test_alert_model_validate_json(benchmark: Any) -> None:
    parsed = benchmark(Alert.model_validate_json, DATA)
    assert parsed == ALERT
    assert parsed.location.region == "KE-30" and parsed.risk_score == 0.8


# ------------------------------------------------------------------ matching


PAIRS = [
    (SUBJECT, "alerts.>", True),
    (SUBJECT, "alerts.KE.>", True),
    (SUBJECT, "alerts.KE.KE-30.>", True),
    (SUBJECT, "alerts.KE.KE-3.>", False),
    (SUBJECT, "alerts.UG.>", False),
    (SUBJECT, "alerts.*.*.high.*", True),
    (SUBJECT, "alerts.*.*.emergency.*", False),
    (SUBJECT, "alerts.KE.KE-30.high.outbreak_risk", True),
]


@pytest.mark.benchmark(group="matching")
def test_naming_matches(benchmark: Any) -> None:
    def run() -> list[bool]:
        return [matches(s, p) for s, p, _ in PAIRS]

    assert benchmark(run) == [want for _, _, want in PAIRS]


@pytest.mark.benchmark(group="matching")
def test_region_filters(benchmark: Any) -> None:
    regions = ["KE", "KE-30", "UG-102", "TZ", "UG", "RW-01", "RW-02"]
    filters = benchmark(NAMES.region_filters, regions)
    assert filters == [
        "alerts.KE.>",
        "alerts.RW.RW-01.>",
        "alerts.RW.RW-02.>",
        "alerts.TZ.>",
        "alerts.UG.>",
    ]


@pytest.mark.benchmark(group="matching")
def test_subscription_matches(benchmark: Any) -> None:
    subs = [s for s, _ in SUBSCRIPTIONS]
    for s in subs:
        assert isinstance(s.everything, bool)  # cached, as on a live session

    def run() -> list[bool]:
        return [s.matches(ALERT, ("KE",)) for s in subs]

    assert benchmark(run) == [want for _, want in SUBSCRIPTIONS]


@pytest.mark.benchmark(group="matching")
def test_coarse_filters(benchmark: Any) -> None:
    sub = Subscription.model_validate(
        {
            "groups": ["type:outbreak_risk", "type:data_quality", "level:critical"],
            "filters": {"alert_types": ["outbreak_risk", "data_quality", "system_health"]},
        }
    )
    filters = benchmark(coarse_filters, NAMES, sub, ("KE-30", "UG"))
    # level:critical overlaps both type groups: the three boxes merge into one hull
    assert filters == [
        f"alerts.{place}.*.{type_}"
        for place in ("KE.KE-30", "UG.*")
        for type_ in ("data_quality", "outbreak_risk", "system_health")
    ]


# ------------------------------------------------------------------ the window


@pytest.mark.benchmark(group="window")
def test_window_take_ack_cycle(benchmark: Any) -> None:
    """64 alerts sent and tracked, acked ten at a time (cumulative) — one window's worth."""
    items = [InFlight(seq, DATA, None) for seq in range(1, 65)]

    def cycle() -> Window:
        w = Window(64)
        for item in items:
            if not w.is_new(item.seq):
                raise AssertionError(item.seq)
            w.take(item, True)
            if item.seq % 10 == 0:
                w.ack(item.seq)
        w.ack(64)
        return w

    w = benchmark(cycle)
    assert (w.floor, w.next_seq, len(w.items), w.room) == (64, 65, 0, 64)


# ------------------------------------------------------------------ the live feed


LISTENERS = 1_000


def live_sessions() -> tuple[list[Session], list[Session], list[Session]]:
    """1,000 real sessions in live mode, tokens and subscriptions in turn; those of them
    whose token takes ALERT (it is offered to them), and those that must be sent it."""
    settings = Settings()
    gw = SimpleNamespace(settings=settings, names=NAMES)
    sessions: list[Session] = []
    offered: list[Session] = []
    expected: list[Session] = []
    for i in range(LISTENERS):
        regions, in_bound = TOKENS[i % len(TOKENS)]
        subscription, wanted = SUBSCRIPTIONS[(i // len(TOKENS)) % len(SUBSCRIPTIONS)]
        roles = (Role.ADMIN,) if regions is None else (Role.HEALTH_WORKER,)
        claims = Claims(sub=f"user-{i}", exp=time.time() + 3600, roles=roles, regions=regions or ())
        device = Device(claims, f"phone-{i}", "client" if i % 2 else "auto")
        s = Session(gw, None, device)  # type: ignore[arg-type]
        s.subscription = subscription
        s.mode = Mode.LIVE
        sessions.append(s)
        if in_bound:
            offered.append(s)
            if wanted:
                expected.append(s)
    return sessions, offered, expected


@pytest.mark.benchmark(group="dispatch to 1,000 listeners")
def test_dispatch_to_live_sessions(benchmark: Any) -> None:
    sessions, offered, expected = live_sessions()
    feed = LiveFeed(None, NAMES)  # type: ignore[arg-type]
    for s in sessions:
        feed.register(s)
    seqs = count(1)
    last: list[LiveAlert] = []

    def next_alert() -> tuple[tuple[LiveAlert], dict[str, Any]]:
        """A new alert each round; what the previous one left is acked and written."""
        for s in sessions:
            if s.out:  # a deque once something was queued (an empty tuple before)
                s.out.clear()
            s.window.ack(s.window.next_seq - 1)
        last[:] = [LiveAlert(next(seqs), SUBJECT, DATA, None)]
        return (last[0],), {}

    benchmark.pedantic(feed.dispatch, setup=next_alert, rounds=200, warmup_rounds=5)
    alert = last[0]
    got = [s for s in sessions if (alert.seq, alert.frame) in s.out]
    assert got and {id(s) for s in got} == {id(s) for s in expected}
    assert all(s.mode is Mode.LIVE for s in sessions)  # nobody fell behind
    assert all(s.window.next_seq == alert.seq + 1 for s in offered)  # sent or passed over
    assert not any(s.out for s in sessions if s not in offered)
    assert feed.last_seq == alert.seq


class Stub:
    """A listener that only matches the subject and counts: the fan-out loop alone."""

    __slots__ = ("countries", "filters", "got")

    def __init__(self, regions: tuple[str, ...] | None) -> None:
        self.countries = None if regions is None else frozenset(r[:2] for r in regions)
        self.filters = NAMES.region_filters(regions)
        self.got = 0

    def accepts(self, subject: str) -> bool:
        return any(matches(subject, f) for f in self.filters)

    def offer(self, alert: LiveAlert) -> None:
        self.got += 1


@pytest.mark.benchmark(group="dispatch to 1,000 listeners")
def test_dispatch_to_stubs(benchmark: Any) -> None:
    stubs = [Stub(TOKENS[i % len(TOKENS)][0]) for i in range(LISTENERS)]
    feed = LiveFeed(None, NAMES)  # type: ignore[arg-type]
    for stub in stubs:
        feed.register(stub)
    live = LiveAlert(1, SUBJECT, DATA, None)
    dispatch: Callable[[LiveAlert], None] = feed.dispatch
    benchmark(dispatch, live)
    rounds = feed.received
    assert rounds >= 1
    for i, stub in enumerate(stubs):
        assert stub.got == (rounds if TOKENS[i % len(TOKENS)][1] else 0)
