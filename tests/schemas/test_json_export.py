"""schemas/json/ is what the models render, and it says what the models say."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator

from tocsin.schemas.export import JSON_DIR, documents, render

from . import CONTRACT_ALERT_JSON, client_frames, server_frames

STALE = "is stale or missing: run `make schemas` (python -m tocsin.schemas.export) and commit it"


def schema(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((JSON_DIR / name).read_text(encoding="utf-8"))
    return doc


def validator(name: str) -> Draft202012Validator:
    doc = schema(name)
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc)


@pytest.mark.parametrize("name", sorted(documents()))
def test_exported_file_is_current(name: str) -> None:
    path = JSON_DIR / name
    assert path.is_file(), f"schemas/json/{name} {STALE}"
    expected = render(documents()[name])
    assert path.read_text(encoding="utf-8") == expected, f"schemas/json/{name} {STALE}"


def test_no_orphan_exports() -> None:
    on_disk = {p.name for p in JSON_DIR.glob("*.json")}
    assert on_disk == set(documents()), f"schemas/json/ {STALE}"


def test_render_is_deterministic() -> None:
    docs = documents()
    assert {k: render(v) for k, v in docs.items()} == {k: render(v) for k, v in documents().items()}
    text = render(docs["alert.json"])
    assert text.endswith("}\n")
    assert json.loads(text) == docs["alert.json"]


def test_contract_example_validates_against_alert_schema() -> None:
    validator("alert.json").validate(json.loads(CONTRACT_ALERT_JSON))


@pytest.mark.parametrize(
    "change",
    [
        {"severity": "high"},  # unknown field
        {"alert_id": True},
        {"alert_id": 0},
        {"alert_level": "severe"},
        {"risk_score": 1.5},
        {"location": {"region": "KE-3000"}},
        {"location": {"region": "KE", "city": "Homa Bay"}},
    ],
)
def test_alert_schema_refuses_bad_alerts(change: dict[str, Any]) -> None:
    doc = {**json.loads(CONTRACT_ALERT_JSON), **change}
    with pytest.raises(jsonschema.ValidationError):
        validator("alert.json").validate(doc)


@pytest.mark.parametrize("missing", ["alert_id", "alert_level", "alert_type", "title", "message"])
def test_alert_schema_requires_fields(missing: str) -> None:
    doc = json.loads(CONTRACT_ALERT_JSON)
    del doc[missing]
    with pytest.raises(jsonschema.ValidationError):
        validator("alert.json").validate(doc)


@pytest.mark.parametrize("frame", client_frames(), ids=lambda f: f.type)
def test_client_frames_validate_against_exported_schema(frame: Any) -> None:
    validator("client-frame.json").validate(frame.model_dump(mode="json"))


@pytest.mark.parametrize("frame", server_frames(), ids=lambda f: f.type)
def test_server_frames_validate_against_exported_schema(frame: Any) -> None:
    validator("server-frame.json").validate(frame.model_dump(mode="json"))


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "subscribe_all", "groups": ["region:KE"]},
        {"type": "ping", "ts": 1.0},  # a server frame
        {"type": "", "seq": 1},
        {"type": 1},
    ],
)
def test_unknown_client_frame_type_fails_exported_schema(frame: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator("client-frame.json").validate(frame)


@pytest.mark.parametrize("frame", [{}, {"seq": 1}, {"filters": {}}, {"groups": ["region:KE"]}])
def test_client_frame_without_type_fails_exported_schema(frame: dict[str, Any]) -> None:
    """CONTRACT §6: every frame has a ``type``; the server refuses frames without one, so the
    published schema must too (the models give ``type`` a default, which drops it from
    ``required`` in the exported schema)."""
    with pytest.raises(jsonschema.ValidationError):
        validator("client-frame.json").validate(frame)
