"""The Grafana dashboard and the Prometheus alert rules, and how compose.yaml provisions them.

- Alert rules (``deploy/prometheus/rules/``): ``promtool check rules`` and ``promtool test
  rules`` over the scenarios in ``prometheus_rules*_test.yaml`` (promtool: Debian's
  ``prometheus`` package, fetched by the ``promtool`` fixture at a pinned upstream version);
  and, without promtool, the keys Prometheus' rule format accepts, severities, annotations and
  the labels their templates use.
- Every PromQL expression, the rules' and the dashboard's, parses (``promql-parser``, the
  test extras) and reads only metrics in ``promql.METRICS``, the names tocsin serves, with
  labels they have: a renamed metric or label fails here.
- The dashboard (``deploy/grafana/dashboards/*.json``): the Grafana JSON model's structure,
  the provisioned datasource uid, unique panel ids, a layout without overlaps, defined
  template variables, legends naming labels the query returns.
- compose.yaml mounts the rules where prometheus.yml loads them, Grafana's provisioning
  where Grafana reads it, and Prometheus scrapes the ingest service's metrics port.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import promql_parser as pq
import pytest
import yaml

from . import promql
from .compose import ROOT, container_ports, environment
from .promql import BOTH, INGEST_JOB, METRICS, base_metric, output_labels, selectors, walk
from .promtool import Unavailable
from .promtool import promtool as find_promtool

HERE = Path(__file__).resolve().parent
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.yaml"))
RULE_SCENARIOS = sorted(HERE.glob("prometheus_rules*_test.yaml"))
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCES = sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml"))
PROVIDERS = sorted((GRAFANA / "provisioning" / "dashboards").glob("*.yaml"))

#: What the dashboard must show: every tocsin metric, and the processes' CPU and memory.
DASHBOARD_MUST_READ = {name for name in METRICS if name.startswith("tocsin_")} | {
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
}
SEVERITIES = {"critical", "warning"}


@pytest.fixture(scope="session")
def promtool() -> Path:
    try:
        return find_promtool()
    except Unavailable as exc:
        pytest.skip(str(exc))


def run_promtool(promtool: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(promtool), *map(str, args)], capture_output=True, text=True, timeout=120
    )


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jobs(prometheus_config: dict[str, Any]) -> dict[str, str]:
    """prometheus.yml's job names; tocsin's gateway and ingest jobs map to themselves."""
    names = [job["job_name"] for job in prometheus_config["scrape_configs"]]
    return {name: name if name in BOTH else "" for name in names}


def load_rules(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def alerting_rules() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_FILES:
        for group in load_rules(path)["groups"]:
            for rule in group["rules"]:
                yield path, rule


def mounts(service: Mapping[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: container path to host path."""
    out = {}
    for volume in service.get("volumes") or []:
        if not isinstance(volume, str):
            continue  # the long form: compose.yaml uses the short one throughout
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out[target] = (ROOT / source).resolve()
    return out


def host_path(service: Mapping[str, Any], container_path: str) -> Path | None:
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target) :].lstrip("/")
    return None


# --- the rules ---------------------------------------------------------------------------

#: Prometheus' rule file format (rulefmt): the keys it accepts at each level.
GROUP_KEYS = {"name", "interval", "query_offset", "limit", "labels", "rules"}
ALERT_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
RECORD_KEYS = {"record", "expr", "labels"}
DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def test_there_are_rules_and_dashboards() -> None:
    assert [p.name for p in RULE_FILES] == ["tocsin.yaml"]
    assert [p.name for p in DASHBOARD_FILES] == ["tocsin.json"]
    assert len(RULE_SCENARIOS) == 2


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_files_have_the_shape_prometheus_reads(path: Path) -> None:
    data = load_rules(path)
    assert set(data) == {"groups"}
    groups = [group["name"] for group in data["groups"]]
    assert len(groups) == len(set(groups)), "group names are unique within a file"
    for group in data["groups"]:
        assert set(group) <= GROUP_KEYS, set(group) - GROUP_KEYS
        assert group["rules"], group["name"]
        for rule in group["rules"]:
            keys = ALERT_KEYS if "alert" in rule else RECORD_KEYS
            assert set(rule) <= keys and "expr" in rule, rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            for key in ("for", "keep_firing_for"):
                assert key not in rule or DURATION.fullmatch(rule[key]), rule[key]
            for mapping in ("labels", "annotations"):
                for name, value in (rule.get(mapping) or {}).items():
                    assert LABEL_NAME.fullmatch(name) and isinstance(value, str), (name, value)


def test_every_alert_has_a_for_a_severity_and_what_to_tell_a_human() -> None:
    names = []
    for _, rule in alerting_rules():
        assert "alert" in rule, "only alerting rules here; record rules would need their tests"
        name = rule["alert"]
        names.append(name)
        assert re.fullmatch(r"Tocsin[A-Z][A-Za-z]+", name), name
        assert DURATION.fullmatch(rule.get("for", "")) and rule["for"] != "0s", name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description"}, name
        assert all(len(text) > 20 for text in annotations.values()), name
    assert len(names) == len(set(names)), "alert names are unique"


def test_every_alert_is_in_the_runbook() -> None:
    runbook = (ROOT / "docs" / "operations.md").read_text()
    section = runbook.split("## Dashboards and alerts", 1)
    assert len(section) == 2, "docs/operations.md has a 'Dashboards and alerts' section"
    for _, rule in alerting_rules():
        assert f"`{rule['alert']}`" in section[1], rule["alert"]


def test_annotations_name_only_labels_the_alert_has() -> None:
    for _, rule in alerting_rules():
        labels = output_labels(pq.parse(rule["expr"]))
        assert labels is not None, rule["alert"]
        for text in rule["annotations"].values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= labels, f"{rule['alert']}: {used - labels} not in {sorted(labels)}"


def test_alert_expressions_parse_and_read_only_metrics_tocsin_serves(
    jobs: dict[str, str],
) -> None:
    found = {rule["alert"]: promql.problems(rule["expr"], jobs) for _, rule in alerting_rules()}
    assert {alert: problems for alert, problems in found.items() if problems} == {}


def test_the_checks_catch_a_renamed_metric_a_wrong_label_and_a_wrong_job(
    jobs: dict[str, str],
) -> None:
    def problems(expr: str) -> str:
        return "\n".join(promql.problems(expr, jobs))

    assert problems("sum(rate(tocsin_gateway_alerts_sent_total[5m]))") == ""
    assert "not a metric" in problems("sum(rate(tocsin_gateway_alerts_send_total[5m]))")
    assert "does not parse" in problems("sum(rate(tocsin_gateway_alerts_sent_total))")
    assert "does not parse" in problems("rte(tocsin_gateway_acks_total[5m])")
    assert "no label 'reason'" in problems('tocsin_gateway_acks_total{reason="x"}')
    assert "not in ['backlog', 'live']" in problems(
        'tocsin_delivery_latency_seconds_count{path="Live"}'
    )
    assert "histogram" in problems("tocsin_delivery_latency_seconds")
    assert "not served by job 'tocsin-gateway'" in problems(
        'tocsin_ingest_duplicates_total{job="tocsin-gateway"}'
    )
    assert "without le" in problems(
        "histogram_quantile(0.9, sum by (path) (rate(tocsin_delivery_latency_seconds_bucket[5m])))"
    )
    assert "grouping by labels its input lacks" in problems(
        "sum by (reason) (rate(tocsin_gateway_acks_total[5m]))"
    )


def test_every_alert_has_a_scenario_where_it_fires() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_SCENARIOS:
        data = yaml.safe_load(path.read_text())
        assert [(HERE / f).resolve() for f in data["rule_files"]] == RULE_FILES, path
        for test in data["tests"]:
            for case in test["alert_rule_test"]:
                (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for _, rule in alerting_rules()}
    assert alerts - fired == set(), "alerts without a scenario in which they fire"
    assert (fired | quiet) <= alerts, "scenarios of alerts that do not exist"


@pytest.mark.timeout(300)  # the first run fetches promtool
def test_promtool_accepts_the_rules(promtool: Path) -> None:
    result = run_promtool(promtool, "check", "rules", "--lint=all", "--lint-fatal", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def without_annotations(rules: Path, dest: Path) -> Path:
    data = load_rules(rules)
    for group in data["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return dest


@pytest.mark.timeout(300)
@pytest.mark.parametrize("scenarios", RULE_SCENARIOS, ids=lambda p: p.name)
def test_the_rules_fire_in_their_scenarios_and_stay_quiet_otherwise(
    promtool: Path, scenarios: Path, tmp_path: Path
) -> None:
    data = yaml.safe_load(scenarios.read_text())
    copies = [without_annotations(HERE / f, tmp_path / Path(f).name) for f in data["rule_files"]]
    data["rule_files"] = [str(p) for p in copies]
    test_file = tmp_path / scenarios.name
    test_file.write_text(yaml.safe_dump(data, sort_keys=False))
    result = run_promtool(promtool, "test", "rules", test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.timeout(300)
def test_promtool_accepts_the_prometheus_config_with_its_rules(
    promtool: Path, prometheus_config: dict[str, Any], services: dict[str, Any], tmp_path: Path
) -> None:
    # The config as the container sees it: rule_files resolved through compose's mounts.
    config = json.loads(json.dumps(prometheus_config))
    config["rule_files"] = [
        str(host_path(services["prometheus"], pattern)) for pattern in config["rule_files"]
    ]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run_promtool(promtool, "check", "config", "--lint=all", "--lint-fatal", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in result.stdout, result.stdout
    for rules in RULE_FILES:
        assert f"Checking {rules}" in result.stdout, result.stdout


# --- Prometheus and Grafana in compose.yaml ----------------------------------------------


def test_prometheus_loads_every_rule_file_compose_mounts(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    prometheus = services["prometheus"]
    loaded: set[Path] = set()
    for pattern in prometheus_config["rule_files"]:
        assert pattern.startswith("/"), "relative rule_files resolve against the config's dir"
        source = host_path(prometheus, pattern)
        assert source is not None, f"{pattern}: not under a mount of the prometheus service"
        loaded |= {p for p in RULE_FILES if fnmatch.fnmatch(str(p), str(source))}
    assert loaded == set(RULE_FILES)
    assert mounts(prometheus)["/etc/prometheus/rules"] == RULES_DIR
    assert "/etc/prometheus/rules:ro" in " ".join(prometheus["volumes"])


def test_prometheus_scrapes_the_ingest_service_on_its_metrics_port(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == INGEST_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (target,) = [t for static in job["static_configs"] for t in static["targets"]]
    host, port = target.rsplit(":", 1)
    env = environment(services[host])
    assert services[host]["command"] == ["ingest"]
    assert env["TOCSIN_INGEST_METRICS_PORT"] == port and int(port) in container_ports(
        services[host]
    )
    assert env["TOCSIN_HTTP_HOST"] == "0.0.0.0"  # reachable from the prometheus container
    for scrape in prometheus_config["scrape_configs"]:
        assert not scrape.get("honor_labels"), "TARGET_LABELS assumes instance is the target"


def test_grafana_runs_with_its_provisioning_after_prometheus(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"]), grafana["image"]
    assert grafana["depends_on"] == {"prometheus": {"condition": "service_healthy"}}
    assert mounts(grafana)["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert all(v.endswith(":ro") for v in grafana["volumes"] if v.startswith("./"))
    ports = [str(p) for p in grafana["ports"]]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), "Grafana on loopback only"
    home = environment(grafana).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert host_path(grafana, home) in DASHBOARD_FILES


@pytest.fixture(scope="module")
def datasource() -> dict[str, Any]:
    (path,) = DATASOURCES
    data = yaml.safe_load(path.read_text())
    assert data["apiVersion"] == 1
    (source,) = data["datasources"]
    assert isinstance(source, dict)
    return source


def test_the_datasource_is_compose_prometheus(
    datasource: dict[str, Any], services: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    assert datasource["type"] == "prometheus" and datasource["access"] == "proxy"
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", datasource["uid"])
    url = urlsplit(datasource["url"])
    assert url.scheme == "http" and url.hostname == "prometheus"
    assert url.port in container_ports(services["prometheus"])
    flag = "--web.listen-address="
    listen = [a for a in services["prometheus"]["command"] if a.startswith(flag)]
    assert not listen or listen[0].endswith(f":{url.port}")
    # $__rate_interval is 4 x timeInterval at least: it must be the real scrape interval.
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]


def test_the_dashboard_provider_reads_the_mounted_dashboards(services: dict[str, Any]) -> None:
    (path,) = PROVIDERS
    data = yaml.safe_load(path.read_text())
    assert data["apiVersion"] == 1
    (provider,) = data["providers"]
    assert provider["type"] == "file"
    folder = host_path(services["grafana"], provider["options"]["path"])
    assert folder == GRAFANA / "dashboards"


# --- the dashboard -----------------------------------------------------------------------

PANEL_TYPES = {"row", "timeseries", "stat", "state-timeline", "table", "gauge", "bargauge", "text"}
GRID_COLUMNS = 24


def load_dashboard(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def all_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(dashboard: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, PromQL, the target or annotation) for every query the dashboard runs."""
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['id']} {panel['title']!r} {target['refId']}",
                target["expr"],
                target,
            )
    for annotation in dashboard["annotations"]["list"]:
        if annotation.get("expr"):
            yield f"annotation {annotation['name']!r}", annotation["expr"], annotation
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text)
            assert m, f"variable {variable['name']}: {text}"
            yield f"variable {variable['name']}", m[1], variable


@pytest.fixture(scope="module", params=DASHBOARD_FILES, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load_dashboard(request.param)


def test_the_dashboard_is_a_current_grafana_model_with_a_fixed_uid(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "tocsin-overview" and dashboard["title"]
    assert dashboard.get("id") is None, "provisioned dashboards get their id from Grafana"
    assert isinstance(dashboard["panels"], list) and dashboard["panels"]
    assert {"from", "to"} <= set(dashboard["time"])
    assert not any(p["type"] == "graph" for p in all_panels(dashboard)), "graph is removed"


def test_panels_have_unique_ids_and_a_layout_without_overlaps(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert all(isinstance(i, int) for i in ids) and len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert set(grid) >= {"h", "w", "x", "y"}, panel["id"]
        assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in "hwxy"), panel["id"]
        assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= GRID_COLUMNS
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap"
                cells[(x, y)] = panel["id"]


def test_every_panel_queries_the_provisioned_datasource(
    dashboard: dict[str, Any], datasource: dict[str, Any]
) -> None:
    expected = {"type": "prometheus", "uid": datasource["uid"]}
    for panel in all_panels(dashboard):
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel.get("title"), panel["id"]
        if panel["type"] == "row":
            assert "targets" not in panel and panel["gridPos"]["w"] == GRID_COLUMNS
            assert panel.get("collapsed") or panel.get("panels", []) == []
            continue
        if panel["type"] == "text":
            continue
        assert panel["datasource"] == expected, panel["title"]
        targets = panel["targets"]
        assert targets, panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in targets:
            assert target["datasource"] == expected, panel["title"]
            assert isinstance(target["expr"], str) and target["expr"].strip(), panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]
    for annotation in dashboard["annotations"]["list"]:
        if not annotation.get("builtIn"):
            assert annotation["datasource"] == expected, annotation["name"]


def test_every_dashboard_query_parses_and_reads_only_metrics_tocsin_serves(
    dashboard: dict[str, Any], jobs: dict[str, str]
) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    problems = {}
    for where, expr, _ in queries(dashboard):
        text, unknown = promql.substitute(expr, variables)
        found = [f"undefined variable ${name}" for name in unknown]
        found += promql.problems(text, jobs)
        if found:
            problems[where] = found
    assert problems == {}


def test_legends_name_labels_their_query_returns(dashboard: dict[str, Any]) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    problems = []
    for where, expr, target in queries(dashboard):
        legend = target.get("legendFormat") or target.get("titleFormat") or ""
        used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
        labels = output_labels(pq.parse(promql.substitute(expr, variables)[0]))
        if labels is not None and not used <= labels:
            problems.append(f"{where}: {sorted(used - labels)} not in {sorted(labels)}")
    assert problems == []


def test_the_dashboard_shows_every_tocsin_metric(dashboard: dict[str, Any]) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    read = set()
    for _, expr, _ in queries(dashboard):
        tree = pq.parse(promql.substitute(expr, variables)[0])
        read |= {base_metric(s.name or "") for s in selectors(tree)}
    assert DASHBOARD_MUST_READ - read == set()


def test_latency_panels_show_p50_p90_p99_by_path(dashboard: dict[str, Any]) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    quantiles: dict[str, set[float]] = {}
    for _, expr, _ in queries(dashboard):
        tree = pq.parse(promql.substitute(expr, variables)[0])
        for node in walk(tree):
            if not (isinstance(node, pq.Call) and node.func.name == "histogram_quantile"):
                continue
            q = node.args[0]
            assert isinstance(q, pq.NumberLiteral)
            for selector in selectors(node):
                paths = [m.value for m in selector.matchers.matchers if m.name == "path"]
                key = f"{base_metric(selector.name or '')} {','.join(paths)}".strip()
                quantiles.setdefault(key, set()).add(q.val)
    for key in (
        "tocsin_delivery_latency_seconds live",
        "tocsin_delivery_latency_seconds backlog",
        "tocsin_gateway_handshake_seconds",
        "tocsin_gateway_catchup_seconds",
    ):
        assert {0.5, 0.9, 0.99} <= quantiles.get(key, set()), key
