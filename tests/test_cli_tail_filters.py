"""``tocsin tail`` with subscriptions (issue 3): the flags → (query parameters, frames)
translation and its one-line errors, then the real ``tocsin tail`` process against a real
gateway, printing only the alerts its groups and filters let through."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from tocsin.cli import build_parser
from tocsin.cli.common import Fail
from tocsin.cli.tail import Subscribing, subscribing
from tocsin.core.embedded import free_port
from tocsin.core.naming import Names
from tocsin.core.supervisor import settings_env
from tocsin.schemas.subscription import Filters

from .support import RunningGateway, alert, append, eventually, token
from .test_cli import SECRET, clean_env, lines, tocsin

#: A process's deadline: it starts Python and imports tocsin before it connects.
PROCESS_DEADLINE = 30.0


def translate(*flags: str, token_regions: tuple[str, ...] | None = None) -> Subscribing:
    """The flags as argparse reads them from ``tocsin tail ...``, translated."""
    return subscribing(build_parser().parse_args(["tail", *flags]), token_regions)


def refused(*flags: str, token_regions: tuple[str, ...] | None = None) -> str:
    with pytest.raises(Fail) as caught:
        translate(*flags, token_regions=token_regions)
    assert caught.value.code == 2
    assert "\n" not in caught.value.message
    return caught.value.message


# --------------------------------------------------------------------------- translation


def test_no_filter_flags_keep_the_stored_filters() -> None:
    wanted = translate("--user", "alice", "--regions", "KE")
    assert wanted == Subscribing(params={})
    assert wanted.frames() == []


def test_groups_become_one_subscribe_frame_in_order_without_repeats() -> None:
    wanted = translate(
        "--group", "region:KE-30", "--group", "level:high", "--group", "region:KE-30"
    )
    assert wanted.params == {}
    assert wanted.frames() == [{"type": "subscribe", "groups": ["region:KE-30", "level:high"]}]


def test_clear_filters_sends_an_empty_update_before_subscribing() -> None:
    wanted = translate("--clear-filters", "--group", "type:outbreak_risk")
    assert wanted.params == {}
    assert wanted.frames() == [
        {"type": "update_filters", "filters": {}},
        {"type": "subscribe", "groups": ["type:outbreak_risk"]},
    ]


def test_ungroup_sends_unsubscribe_before_subscribe() -> None:
    wanted = translate("--group", "level:high", "--ungroup", "region:KE-30", "--clear-filters")
    assert wanted.frames() == [
        {"type": "update_filters", "filters": {}},
        {"type": "unsubscribe", "groups": ["region:KE-30"]},
        {"type": "subscribe", "groups": ["level:high"]},
    ]
    assert "--ungroup:" in refused("--ungroup", "region:Kenya")


def test_threshold_and_types_go_in_the_connect_url() -> None:
    wanted = translate("--risk-threshold", "0.5", "--alert-types", "outbreak_risk,case_cluster")
    assert wanted.params == {"risk_threshold": "0.5", "alert_types": "outbreak_risk,case_cluster"}
    assert wanted.frames() == []
    assert Filters.from_query(wanted.params) == Filters(
        risk_threshold=0.5, alert_types=("case_cluster", "outbreak_risk")
    )


@pytest.mark.parametrize(
    ("flags", "location"),
    [
        (("--bbox=177,-19,-178,-16",), {"bbox": [177, -19, -178, -16]}),
        (("--bbox", "177,-19,-178,-16"), {"bbox": [177, -19, -178, -16]}),
        # A value that starts with a minus is a value, not an unknown option.
        (("--bbox", "-180,-10.5,10,10"), {"bbox": [-180, -10.5, 10, 10]}),
        (("--bbox=-180,-10.5,10,10",), {"bbox": [-180, -10.5, 10, 10]}),
        (("--near", "-1.29,36.82,50"), {"near": {"lat": -1.29, "lon": 36.82, "radius_km": 50}}),
        (("--near=-1.29,-36.82,0",), {"near": {"lat": -1.29, "lon": -36.82, "radius_km": 0}}),
        (("--location-regions", "KE, UG-102"), {"regions": ["KE", "UG-102"]}),
        (
            ("--location-regions", "KE-30", "--near", "-1.29,36.82,50"),
            {"regions": ["KE-30"], "near": {"lat": -1.29, "lon": 36.82, "radius_km": 50}},
        ),
        (
            ("--bbox", "33,-5,42,5", "--location-regions", "KE"),
            {"regions": ["KE"], "bbox": [33, -5, 42, 5]},
        ),
    ],
)
def test_location_flags_build_one_location_filter(
    flags: tuple[str, ...], location: dict[str, Any]
) -> None:
    wanted = translate(*flags)
    assert set(wanted.params) == {"location_filter"}
    assert json.loads(wanted.params["location_filter"]) == location
    # What is sent is what the gateway's model reads back.
    assert Filters.from_query(wanted.params) == Filters.from_update({"location_filter": location})


def test_a_raw_location_filter_is_sent_as_given() -> None:
    raw = '{"near": {"lat": -17.7, "lon": 178.1, "radius_km": 25}, "regions": ["FJ"]}'
    assert translate("--location-filter", raw).params == {"location_filter": raw}


def test_token_regions_bound_region_groups_only_when_known() -> None:
    assert translate("--group", "region:UG", token_regions=None).groups == ("region:UG",)
    within = translate("--group", "region:KE-30", "--group", "level:low", token_regions=("KE",))
    assert within.groups == ("region:KE-30", "level:low")
    message = refused("--group", "region:UG-102", "--group", "level:low", token_regions=("KE",))
    assert message.startswith("--group: region:UG-102:") and "(KE)" in message


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("flags", "starts"),
    [
        (("--group", "region:Kenya"), "--group: group 'region:Kenya'"),
        (("--group", "colour:red"), "--group: group 'colour:red': unknown kind"),
        (("--group", "level:extreme"), "--group: group 'level:extreme'"),
        (("--group", "KE"), "--group: group 'KE': expected <kind>:<value>"),
        (("--location-regions", "Kenya"), "--location-regions: 'Kenya' is not a region"),
        (("--location-regions", ","), "--location-regions: list at least one region"),
        (("--bbox", "1,2,3"), "--bbox: expected MIN_LON,MIN_LAT,MAX_LON,MAX_LAT"),
        (("--bbox", "1,2,3,x"), "--bbox: expected MIN_LON,MIN_LAT,MAX_LON,MAX_LAT"),
        (("--bbox=177,-91,-178,-16",), "--bbox: lat must lie in [-90, 90]"),
        (("--bbox", "-10,5,10,-5"), "--bbox: lat must lie in [-90, 90] with min_lat <= max_lat"),
        (("--bbox=-181,-19,-178,-16",), "--bbox: lon must lie in [-180, 180]"),
        (("--bbox", "nan,0,1,1"), "--bbox: numbers must be finite"),
        (("--near", "-1.29,36.82"), "--near: expected LAT,LON,RADIUS_KM"),
        (("--near", "-91,36.82,5"), "--near: lat:"),
        (("--near", "-1.29,-181,5"), "--near: lon:"),
        (("--near", "-1.29,36.82,-5"), "--near: radius_km:"),
        (("--near", "1,2,inf"), "--near: numbers must be finite"),
        (("--bbox", "1,2,3,4", "--near", "1,2,3"), "--bbox, --near: give one of them"),
        (("--location-filter", "{x"), "--location-filter: not valid JSON"),
        (("--location-filter", "{}"), "--location-filter: give regions, bbox or near"),
        (("--location-filter", '{"bbox": [1, 95, 2, 96]}'), "--location-filter: bbox: lat"),
        (("--location-filter", '{"colour": 1}'), "--location-filter: colour:"),
        (
            ("--location-filter", '{"regions": ["KE"]}', "--bbox", "1,2,3,4"),
            "--location-filter: give it or --bbox, not both",
        ),
        (("--risk-threshold", "high"), "--risk-threshold: Input should be a valid number"),
        (("--risk-threshold", "-0.5"), "--risk-threshold: Input should be greater than"),
        (("--risk-threshold", "1.5"), "--risk-threshold: Input should be less than"),
        (("--alert-types", "Outbreak Risk"), "--alert-types: 'Outbreak Risk' is not an alert"),
        (("--alert-types", ",,"), "--alert-types: name at least one type"),
        (("--alert-types", " "), "--alert-types: empty"),
        (("--bbox", ""), "--bbox: empty"),
        (("--clear-filters", "--risk-threshold", "0.1"), "--clear-filters:"),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(flags: tuple[str, ...], starts: str) -> None:
    assert refused(*flags).startswith(starts)


def test_too_many_groups_are_refused() -> None:
    flags = [f for n in range(65) for f in ("--group", f"type:t{n}")]
    assert refused(*flags).startswith("--group: at most 64 groups")


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (("--group", "region:Kenya"), "--group"),
        (("--group", "region:UG"), "--group"),  # outside the minted token's regions
        (("--bbox=177,-91,-178,-16",), "--bbox"),
        (("--near", "-1.29,36.82,-5"), "--near"),
        (("--risk-threshold", "2"), "--risk-threshold"),
    ],
)
def test_the_process_refuses_a_bad_flag_before_connecting(
    tmp_path: Path, flags: tuple[str, ...], flag: str
) -> None:
    # Nothing listens: exit 2 (not the connection failure's 1) shows it never tried.
    env = clean_env(TOCSIN_JWT_SECRET=SECRET, TOCSIN_HTTP_PORT=str(free_port()))
    out = tocsin("tail", "--user", "alice", "--regions", "KE", *flags, env=env, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    [line] = lines(out.stderr)
    assert line.startswith(f"tocsin tail: {flag}: ")
    assert out.stdout == ""


# --------------------------------------------------------------------------- real gateway


class Tail:
    """``python -m tocsin tail`` as a real process; stdout and stderr go to files."""

    def __init__(self, gateway: RunningGateway, tmp: Path, *flags: str) -> None:
        self.out = tmp / f"tail-{uuid.uuid4().hex[:6]}.out"
        self.err = self.out.with_suffix(".err")
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tocsin", "tail", "--url", gateway.ws_url, *flags],
                env=settings_env(gateway.settings),
                stdout=out,
                stderr=err,
            )

    def stdout(self) -> str:
        return self.out.read_text()

    def frames(self, kind: str) -> list[dict[str, Any]]:
        found = []
        for line in self.stdout().splitlines():
            if line.startswith("{") and json.loads(line).get("type") == kind:
                found.append(json.loads(line))
        return found

    def alert_ids(self) -> list[str]:
        return [
            part.removeprefix("id=")
            for line in self.stdout().splitlines()
            if line.startswith("alert ")
            for part in line.split()
            if part.startswith("id=")
        ]

    async def until_printed(self, kind: str, what: str) -> dict[str, Any]:
        await eventually(
            lambda: self.proc.poll() is not None or bool(self.frames(kind)),
            PROCESS_DEADLINE,
            what,
        )
        assert self.proc.poll() is None, self.log()
        return self.frames(kind)[0]

    async def exit_code(self) -> int:
        await eventually(lambda: self.proc.poll() is not None, PROCESS_DEADLINE, "tail to exit")
        return self.proc.returncode

    def log(self) -> str:
        return f"stdout:\n{self.stdout()}\nstderr:\n{self.err.read_text()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


StartTail = Callable[..., Tail]


@pytest.fixture
def start_tail(gateway: RunningGateway, tmp_path: Path) -> Iterator[StartTail]:
    """``start_tail("--group level:high ...", client_id=...)``: a tail of its own device
    (a fresh client id unless given) on the test's gateway; killed afterwards if running."""
    started: list[Tail] = []

    def start(command: str, client_id: str | None = None) -> Tail:
        device = client_id or "tail-" + uuid.uuid4().hex[:8]
        tail = Tail(gateway, tmp_path, *shlex.split(command), "--client-id", device)
        started.append(tail)
        return tail

    yield start
    for tail in started:
        tail.kill()


async def test_tail_with_a_group_prints_only_alerts_of_that_group(
    js: JetStreamContext, names: Names, start_tail: StartTail
) -> None:
    tail = start_tail("--user alice --regions KE --group region:KE-30 --count 1")
    response = await tail.until_printed("subscription_response", "the subscribe answer")
    assert response["action"] == "subscribe" and response["status"] == "ok", response
    assert response["subscribed"] == ["region:KE-30"]

    other = alert("KE-40")  # within the token, outside the group: published first
    wanted = alert("KE-30")
    await append(js, names, other)
    await append(js, names, wanted)
    assert await tail.exit_code() == 0, tail.log()
    assert tail.alert_ids() == [str(wanted["alert_id"])], tail.log()


async def test_tail_with_a_risk_threshold_prints_only_riskier_alerts(
    js: JetStreamContext, names: Names, start_tail: StartTail
) -> None:
    tail = start_tail("--user alice --regions KE --risk-threshold 0.5 --count 1")
    hello = await tail.until_printed("connection_established", "the connection")
    assert hello["filters"] == {"risk_threshold": 0.5}, hello

    low = alert("KE-30", risk_score=0.2)
    high = alert("KE-30", risk_score=0.9)
    await append(js, names, low)
    await append(js, names, high)
    assert await tail.exit_code() == 0, tail.log()
    assert tail.alert_ids() == [str(high["alert_id"])], tail.log()


async def test_tail_with_a_bbox_across_the_antimeridian(
    js: JetStreamContext, names: Names, start_tail: StartTail
) -> None:
    tail = start_tail("--user alice --regions FJ --bbox=177,-19,-178,-16 --count 1")
    hello = await tail.until_printed("connection_established", "the connection")
    assert hello["filters"] == {"location_filter": {"bbox": [177, -19, -178, -16]}}, hello

    outside = alert("FJ", location={"region": "FJ", "lat": -17.5, "lon": 170.0})
    inside = alert("FJ", location={"region": "FJ", "lat": -17.5, "lon": -179.5})
    await append(js, names, outside)
    await append(js, names, inside)
    assert await tail.exit_code() == 0, tail.log()
    assert tail.alert_ids() == [str(inside["alert_id"])], tail.log()


async def test_clear_filters_drops_the_stored_filters(
    js: JetStreamContext, names: Names, start_tail: StartTail
) -> None:
    me = "tail-" + uuid.uuid4().hex[:8]
    first = start_tail("--user alice --regions KE --alert-types case_cluster --count 1", me)
    await first.until_printed("connection_established", "the first connection")
    cluster = alert("KE-30", alert_type="case_cluster")
    await append(js, names, cluster)
    assert await first.exit_code() == 0, first.log()
    assert first.alert_ids() == [str(cluster["alert_id"])], first.log()

    second = start_tail("--user alice --regions KE --clear-filters --count 1", me)
    hello = await second.until_printed("connection_established", "the second connection")
    assert hello["filters"] == {"alert_types": ["case_cluster"]}, hello  # kept until cleared
    response = await second.until_printed("subscription_response", "the update_filters answer")
    assert response["action"] == "update_filters" and response["status"] == "ok", response
    assert response["filters"] == {}

    outbreak = alert("KE-30", alert_type="outbreak_risk")
    await append(js, names, outbreak)
    assert await second.exit_code() == 0, second.log()
    # The first tail's alert may come again (at least once); the new one is what counts.
    ids = second.alert_ids()
    assert ids[-1] == str(outbreak["alert_id"]), second.log()
    assert set(ids) <= {str(cluster["alert_id"]), str(outbreak["alert_id"])}, second.log()


async def test_a_denied_group_exits_1_with_the_detail(start_tail: StartTail) -> None:
    # With --token, tail cannot know the token's regions: the gateway decides.
    tail = start_tail(f"--token {token('alice', ('KE',))} --group region:UG-102")
    assert await tail.exit_code() == 1, tail.log()
    [response] = tail.frames("subscription_response")
    assert response["status"] == "denied", response
    [line] = lines(tail.err.read_text())
    assert line.startswith("tocsin: subscribe denied:") and "region:UG-102" in line, line
