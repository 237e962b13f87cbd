"""deploy/prometheus/prometheus.yml: parses, and scrapes every gateway's /metrics."""

from __future__ import annotations

import re
from typing import Any

from .compose import container_ports, environment

#: The keys Prometheus accepts at these levels (its config is strict about unknown keys).
TOP_KEYS = {
    "global",
    "scrape_configs",
    "rule_files",
    "alerting",
    "remote_write",
    "remote_read",
    "storage",
    "tracing",
    "scrape_config_files",
    "otlp",
    "runtime",
}
SCRAPE_KEYS = {
    "job_name",
    "scrape_interval",
    "scrape_timeout",
    "metrics_path",
    "scheme",
    "params",
    "static_configs",
    "honor_labels",
    "honor_timestamps",
    "relabel_configs",
    "metric_relabel_configs",
    "basic_auth",
    "authorization",
    "tls_config",
    "sample_limit",
    "dns_sd_configs",
    "file_sd_configs",
    "docker_sd_configs",
    "scrape_protocols",
}
DURATION = re.compile(r"^((\d+)y)?((\d+)w)?((\d+)d)?((\d+)h)?((\d+)m)?((\d+)s)?((\d+)ms)?$")


def test_the_config_has_only_keys_prometheus_knows(prometheus_config: dict[str, Any]) -> None:
    assert set(prometheus_config) <= TOP_KEYS
    for key in ("scrape_interval", "evaluation_interval", "scrape_timeout"):
        value = prometheus_config.get("global", {}).get(key)
        assert value is None or (value and DURATION.fullmatch(value)), f"{key}: {value!r}"
    jobs = [job["job_name"] for job in prometheus_config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), "job names must be unique"
    for job in prometheus_config["scrape_configs"]:
        assert set(job) <= SCRAPE_KEYS, set(job) - SCRAPE_KEYS
        for static in job.get("static_configs", []):
            assert set(static) <= {"targets", "labels"}
            for target in static["targets"]:
                assert re.fullmatch(r"[a-z0-9.-]+:\d+", target), target


def test_compose_mounts_it_where_prometheus_is_told_to_read_it(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in prometheus["volumes"]}
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts[flag.split("=", 1)[1]] == "./deploy/prometheus/prometheus.yml"


def test_every_gateway_is_scraped_on_its_metrics_path(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    gateways = {n for n, s in services.items() if s.get("command") == ["gateway"]}
    scraped: set[str] = set()
    for job in prometheus_config["scrape_configs"]:
        if job.get("metrics_path", "/metrics") != "/metrics":
            continue
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host in gateways:
                    assert environment(services[host])["TOCSIN_HTTP_PORT"] == port
                    assert int(port) in container_ports(services[host])
                    scraped.add(host)
    assert scraped == gateways and len(gateways) == 2


def test_every_target_is_a_compose_service_or_prometheus_itself(
    prometheus_config: dict[str, Any], services: dict[str, Any]
) -> None:
    for job in prometheus_config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in services or host == "localhost", target
