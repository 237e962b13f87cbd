"""schemas/json/ against what a real gateway sends and accepts.

Every server frame type is provoked from a real gateway (real nats-server) and validated
with server-frame.json, also with an unknown field added and as an unknown type (the
schema is open on that side); client frames the server refuses fail client-frame.json and
get an ``error`` frame naming the field (closed on that side). Then a client model is
generated from the schemas with datamodel-code-generator and parses the same real frames.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator
from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.schemas.export import JSON_DIR

from ..support import Client, alert, append, start_gateway, token

FORMATS = Draft202012Validator.FORMAT_CHECKER


def validator(name: str) -> Draft202012Validator:
    doc = json.loads((JSON_DIR / name).read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(doc)
    return Draft202012Validator(doc, format_checker=FORMATS)


@pytest.fixture
async def real_frames(
    make_settings: Callable[..., Settings], js: JetStreamContext, names: Names
) -> dict[str, dict[str, Any]]:
    """One real frame of every server type, by type (the last one seen of each)."""
    settings = make_settings(
        heartbeat_seconds=1.0, offline_queue_max=1, rate_limit_burst=3, max_messages_per_minute=1
    )
    running = await start_gateway(settings)
    got: dict[str, dict[str, Any]] = {}
    try:
        tok = token("schema", ("KE",))
        await Client.introduce(running.ws_url, tok, client_id="d")
        # Away: two alerts (one with every optional field, one with none); the cap of 1
        # drops the older: backlog_truncated, then the newer as the backlog.
        await append(js, names, alert("KE-30", risk_score=0.5))
        await append(js, names, {k: v for k, v in alert("KE").items() if k != "risk_score"})
        client = await Client.connect(running.ws_url, tok, client_id="d")
        client.answer_pings = False  # keep them as frames; the stack's WS pongs keep it alive
        for kind in ("connection_established", "backlog_truncated", "alert"):
            got[kind] = await client.next(kind)
        await client.send({"type": "ack", "seq": got["alert"]["seq"]})
        full = alert(
            "KE-30",
            location={"region": "KE-30", "lat": -0.09, "lon": 34.77},
            confidence_score=0.9,
            affected_population=10,
            action_required=True,
            action_url="https://example.org/a",
            created_at="2026-11-25T10:00:00Z",
            expiry_time="2099-11-26T10:00:00Z",
        )
        await append(js, names, full)
        got["alert_full"] = await client.next("alert")
        got["ping"] = await client.next("ping")
        await client.send({"type": "pong", "ts": got["ping"]["ts"]})
        await client.send(
            {
                "type": "update_filters",
                "filters": {
                    "risk_threshold": 0.5,
                    "location_filter": {
                        "near": {"lat": 0, "lon": 34, "radius_km": 9},
                        "regions": ["KE"],
                    },
                    "alert_types": ["a_b"],
                },
            }
        )
        got["subscription_response"] = await client.next("subscription_response")
        await client.send({"type": "get_stats"})
        got["connection_stats"] = await client.next("connection_stats")
        await client.send({"type": "ack", "seq": "5"})
        got["error"] = await client.next("error")
        for _ in range(3):  # the bucket of 3 is spent (1 frame a minute refills it)
            await client.send({"type": "get_stats"})
        got["rate_limit_warning"] = await client.next("rate_limit_warning")
        await client.close()
    finally:
        await running.stop()
    return got


async def test_every_real_server_frame_validates_and_the_schema_is_open(
    real_frames: dict[str, dict[str, Any]],
) -> None:
    server = validator("server-frame.json")
    assert {f["type"] for f in real_frames.values()} == {
        "connection_established", "backlog_truncated", "alert", "ping",
        "subscription_response", "connection_stats", "error", "rate_limit_warning",
    }  # fmt: skip
    for name, frame in real_frames.items():
        server.validate(frame)
        # A later server adds a field to the frame and to the alert: still valid.
        server.validate({**frame, "added_later": {"x": 1}})
        if "alert" in frame:
            server.validate({**frame, "alert": {**frame["alert"], "msg_type": "update"}})
        assert "additionalProperties" not in json.dumps(server.schema), name
    server.validate({"type": "alert_digest", "count": 3})  # an unknown type
    server.validate({**real_frames["error"], "code": "push_not_configured"})  # a new code
    # Open is not lax: a known type with a wrong field type still fails.
    with pytest.raises(jsonschema.ValidationError):
        server.validate({**real_frames["alert"], "seq": "5"})
    with pytest.raises(jsonschema.ValidationError):
        server.validate({"type": "ping"})


async def test_what_the_server_leaves_out_is_optional_and_never_null(
    real_frames: dict[str, dict[str, Any]],
) -> None:
    sparse = real_frames["alert"]["alert"]  # no risk_score, no point, no times
    assert "risk_score" not in sparse and "lat" not in sparse["location"]
    schema: dict[str, Any] = json.loads((JSON_DIR / "server-frame.json").read_text())
    defs = schema["$defs"]
    alert_def = defs["Alert"]
    for name in ("risk_score", "confidence_score", "affected_population", "action_url",
                 "created_at", "expiry_time"):  # fmt: skip
        assert name not in alert_def["required"] and "null" not in json.dumps(
            alert_def["properties"][name]
        ), name
    # What the server always writes is required, so a generated model need not guess.
    assert {"alert_id", "priority", "action_required"} <= set(alert_def["required"])
    assert set(defs["AlertFrame"]["required"]) == {"type", "seq", "alert", "redelivered"}
    assert all(k in real_frames["alert"] for k in defs["AlertFrame"]["required"])
    established = real_frames["connection_established"]
    assert set(defs["ConnectionEstablished"]["required"]) == set(established)


async def test_filters_have_a_schema_on_both_sides(
    real_frames: dict[str, dict[str, Any]],
) -> None:
    server, client = validator("server-frame.json"), validator("client-frame.json")
    shown = real_frames["subscription_response"]["filters"]
    assert set(shown) == {"risk_threshold", "location_filter", "alert_types"}
    server.validate(real_frames["subscription_response"])
    client.validate({"type": "update_filters", "filters": shown})
    client.validate({"type": "update_filters", "filters": {}})
    client.validate({"type": "update_filters", "filters": {"alert_types": "flood,a_b"}})
    bad: dict[str, Any]
    for bad in (
        {"risk_threshold": "0.5"},
        {"risk_threshold": 2},
        {"colour": "red"},
        {"location_filter": {}},
        {"location_filter": {"bbox": [1, 2, 3]}},
        {"location_filter": {"bbox": [1, 2, 3, 4], "near": {"lat": 0, "lon": 0, "radius_km": 1}}},
        {"location_filter": {"regions": ["Kenya"]}},
        {"location_filter": {"near": {"lat": 0, "lon": 0}}},
        {"alert_types": []},
    ):
        with pytest.raises(jsonschema.ValidationError):
            client.validate({"type": "update_filters", "filters": bad})


@pytest.mark.parametrize(
    ("frame", "field"),
    [
        ({"type": "ack", "seq": "5"}, "seq"),
        ({"type": "ack", "seq": True}, "seq"),
        ({"type": "ack", "seq": 5, "extra": 1}, "extra"),
        ({"type": "pong", "ts": "1.5"}, "ts"),
        ({"type": "pong", "ts": False}, "ts"),
        ({"type": "subscribe", "groups": "region:KE"}, "groups"),
        ({"type": "subscribe", "groups": [1]}, "groups"),
        ({"type": "unsubscribe", "groups": [True]}, "groups"),
        ({"type": "update_filters", "filters": "risk_threshold=0.5"}, "filters"),
        ({"type": "get_stats", "verbose": True}, "verbose"),
        ({"seq": True}, "type"),
    ],
)
async def test_the_client_schema_and_the_server_refuse_the_same_frames(
    make_settings: Callable[..., Settings], js: JetStreamContext, frame: dict[str, Any], field: str
) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator("client-frame.json").validate(frame)
    running = await start_gateway(make_settings())
    try:
        client = await Client.connect(running.ws_url, token("strict"), client_id="s")
        await client.next("connection_established")
        await client.send(frame)
        error = await client.next("error")
        assert error["code"] in ("invalid_frame", "unknown_type"), error
        assert error["detail"].startswith(field), error
        validator("server-frame.json").validate(error)
        await client.close()
    finally:
        await running.stop()


def _generate(tmp_path: Path, name: str) -> Any:
    out = tmp_path / f"{name.replace('-', '_').removesuffix('.json')}.py"
    subprocess.run(
        [
            sys.executable, "-m", "datamodel_code_generator",
            "--input", str(JSON_DIR / name), "--input-file-type", "jsonschema",
            "--output-model-type", "pydantic_v2.BaseModel", "--formatters", "builtin",
            "--output", str(out),
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    spec = importlib.util.spec_from_file_location(out.stem, out)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[out.stem] = module
    spec.loader.exec_module(module)
    return module


async def test_a_generated_client_model_parses_real_frames(
    real_frames: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    server = _generate(tmp_path, "server-frame.json")
    for name, frame in real_frames.items():
        for sent in (frame, {**frame, "added_later": 1}):
            parsed = server.Model.model_validate(sent).root
            assert type(parsed).__name__ != "UnknownFrame", (name, parsed)
            assert parsed.type == frame["type"]
    alert = server.Model.model_validate(real_frames["alert_full"]).root
    assert str(
        alert.alert.alert_id.root if hasattr(alert.alert.alert_id, "root") else alert.alert.alert_id
    ) == str(real_frames["alert_full"]["alert"]["alert_id"])
    new_code = {**real_frames["error"], "code": "push_not_configured"}
    assert type(server.Model.model_validate(new_code).root).__name__ == "Error"
    later = server.Model.model_validate({"type": "alert_digest", "count": 3}).root
    assert type(later).__name__ == "UnknownFrame" and later.type == "alert_digest"

    client = _generate(tmp_path, "client-frame.json")
    ack = client.Model.model_validate({"type": "ack", "seq": 5}).root
    assert ack.seq == 5
    with pytest.raises(ValueError):
        client.Model.model_validate({"type": "ack", "seq": 5, "extra": 1})
