"""compose.yaml as Compose reads it: YAML (with merge keys), then ``${...}`` interpolation."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"

#: What an operator would set: placeholders for the variables compose.yaml requires.
PLACEHOLDERS = {
    "TOCSIN_JWT_SECRET": "placeholder-secret-0123456789abcdef-0123",
    "NATS_ENGINE_PASSWORD": "placeholder-engine",
    "NATS_INGEST_PASSWORD": "placeholder-ingest",
    "NATS_GATEWAY_PASSWORD": "placeholder-gateway",
    "NATS_OPERATOR_PASSWORD": "placeholder-operator",
}

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A required variable (``${NAME:?message}``) is unset; the message is Compose's."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable syntax: ``$$``, ``$NAME``, ``${NAME}``, ``${NAME:-default}``,
    ``${NAME-default}``, ``${NAME:?error}``, ``${NAME?error}``, ``${NAME:+alt}``."""

    def one(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        op, arg = m["op"], m["arg"] or ""
        value = env.get(name)
        unset_or_empty = not value
        missing = unset_or_empty if (op or "").startswith(":") else value is None
        if op in (":-", "-"):
            return arg if missing else str(value)
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"required variable {name} is missing a value: {arg}")
            return str(value)
        if op in (":+", "+"):
            return "" if missing else arg
        return value or ""

    return _VAR.sub(one, text)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def load_raw(path: Path = COMPOSE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def load(env: Mapping[str, str] | None = None, path: Path = COMPOSE) -> dict[str, Any]:
    """The model Compose would run, with ``env`` (default: the placeholders) interpolated."""
    return _walk(load_raw(path), PLACEHOLDERS if env is None else env)  # type: ignore[no-any-return]


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, from either the mapping or the ``KEY=value`` list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        pairs = (item.split("=", 1) for item in env)
        return {k: v for k, v in pairs}
    return {k: "" if v is None else str(v) for k, v in env.items()}


def bind_sources(service: Mapping[str, Any]) -> list[str]:
    """The host paths of a service's bind mounts (short ``src:dst[:mode]`` or long form)."""
    sources = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                sources.append(source)
        elif volume.get("type") == "bind":
            sources.append(volume["source"])
    return sources


def container_ports(service: Mapping[str, Any]) -> set[int]:
    """Ports the service offers on the compose network: ``expose`` and published ports."""
    ports = {int(p) for p in service.get("expose") or []}
    for mapping in service.get("ports") or []:
        text = str(mapping).split("/")[0]
        ports.add(int(text.rsplit(":", 1)[-1]))
    return ports
