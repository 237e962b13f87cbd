"""docs/asyncapi.yaml: a valid AsyncAPI 3.0.0 document (against the official JSON Schema
committed in schemas/asyncapi/), whose references all resolve, whose examples are valid
frames, and that lists every frame type, close code and query parameter of the server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, Draft202012Validator

from tocsin.core.naming import Names
from tocsin.schemas.codes import Close
from tocsin.schemas.export import JSON_DIR, documents
from tocsin.schemas.subscription import FILTER_KEYS

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.yaml"
SPEC = ROOT / "schemas" / "asyncapi" / "asyncapi-3.0.0.schema.json"


def load() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    return doc


def pointer(doc: Any, path: str) -> Any:
    for part in filter(None, path.split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_the_document_is_valid_asyncapi_3() -> None:
    spec = json.loads(SPEC.read_text(encoding="utf-8"))
    Draft7Validator.check_schema(spec)
    errors = sorted(Draft7Validator(spec).iter_errors(load()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_the_validator_catches_a_broken_document() -> None:
    """The check can fail: a document with a wrong action or version is refused."""
    validator = Draft7Validator(json.loads(SPEC.read_text(encoding="utf-8")))
    doc = load()
    doc["operations"]["sendServerFrames"]["action"] = "publish"  # AsyncAPI 2's word
    assert not validator.is_valid(doc)
    assert not validator.is_valid({**load(), "asyncapi": "2.6.0"})


def test_every_reference_resolves() -> None:
    doc = load()
    for ref in refs(doc):
        target, _, path = ref.partition("#")
        if not target:
            pointer(doc, path)  # KeyError if it does not exist
            continue
        file = (DOC.parent / target).resolve()
        assert file.is_file(), ref
        assert file.parent == JSON_DIR, f"{ref}: payloads come from schemas/json/"
        pointer(json.loads(file.read_text(encoding="utf-8")), path)


def _message_schema(doc: dict[str, Any], message: dict[str, Any]) -> Draft202012Validator:
    target, _, path = message["payload"]["schema"]["$ref"].partition("#")
    whole = json.loads((DOC.parent / target).read_text(encoding="utf-8"))
    schema = {"$ref": f"#{path}", "$defs": whole.get("$defs", {})} if path else whole
    return Draft202012Validator(schema)


def test_examples_are_valid_frames() -> None:
    doc = load()
    checked = 0
    for message in doc["components"]["messages"].values():
        for example in message.get("examples", []):
            _message_schema(doc, message).validate(example["payload"])
            checked += 1
    assert checked >= 8


def test_every_frame_type_of_the_server_has_a_message() -> None:
    doc = load()
    messages = doc["components"]["messages"]
    docs = documents()
    for side, operation in (("server", "sendServerFrames"), ("client", "receiveClientFrames")):
        union = docs[f"{side}-frame.json"]
        defined = {ref["$ref"].rsplit("/", 1)[1] for ref in union["oneOf"]}
        payloads = [
            m.get("payload", {}).get("schema", {}).get("$ref", "") for m in messages.values()
        ]
        prefix = f"../schemas/json/{side}-frame.json#/$defs/"
        named = {r.removeprefix(prefix) for r in payloads if r.startswith(prefix)}
        named &= defined | {"UnknownFrame"}
        defined |= {"UnknownFrame"} if side == "server" else set()
        assert named == defined, (side, defined - named)
        listed = doc["operations"][operation]["messages"]
        assert len(listed) == len(defined)
        for ref in listed:
            pointer(doc, ref["$ref"].removeprefix("#"))


def test_close_codes_and_query_parameters_match_the_server() -> None:
    socket = load()["channels"]["alertsSocket"]
    documented = {c["code"] for c in socket["x-close-codes"]}
    assert documented == {int(c) for c in Close} | {1006}
    query = set(socket["bindings"]["ws"]["query"]["properties"])
    handler = (ROOT / "services" / "tocsin" / "gateway" / "handler.py").read_text()
    read = set(re.findall(r'request\.query\.get\("([a-z_]+)"', handler)) | set(FILTER_KEYS)
    assert query == read


def test_nats_subjects_are_the_ones_the_code_uses() -> None:
    channels = load()["channels"]
    names = Names("")
    assert channels["ingestAlerts"]["address"] == names.ingest_subject
    assert channels["deadLetters"]["address"] == names.dlq_subject("{reason}")
    # alerts.{country}.{region}.{level}.{alert_type}, as a pattern: a real subject fits it.
    address = channels["alertsStream"]["address"]
    pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^.]+)", address.replace(".", r"\."))
    parts = re.fullmatch(pattern, names.alert_subject("KE-30", "high", "outbreak_risk"))
    assert parts is not None, address
    assert parts.groupdict() == {
        "country": "KE", "region": "KE-30", "level": "high", "alert_type": "outbreak_risk"
    }  # fmt: skip
    assert set(channels["alertsStream"]["parameters"]) == set(parts.groupdict())


def test_the_ingest_side_agrees_with_what_faststream_generates() -> None:
    """faststream describes its own subscriber (``faststream docs gen``): every subject it
    receives is a channel of this document that the ingest service receives."""
    from faststream.specification import AsyncAPI

    from tocsin.core.settings import Settings
    from tocsin.ingest.app import create_app

    app = create_app(Settings(jwt_secret="s" * 40), ["nats://127.0.0.1:1"])  # not connected
    assert app.broker is not None
    generated = json.loads(
        AsyncAPI(app.broker, schema_version="3.0.0").to_specification().to_json()
    )
    received = {
        generated["channels"][op["channel"]["$ref"].rsplit("/", 1)[1]]["bindings"]["nats"][
            "subject"
        ]
        for op in generated["operations"].values()
        if op["action"] == "receive"
    }
    assert received == {"ingest.alerts"}
    doc = load()
    ours = {
        pointer(doc, op["channel"]["$ref"].removeprefix("#"))["address"]
        for op in doc["operations"].values()
        if op["action"] == "receive"
        and "nats" in json.dumps(pointer(doc, op["channel"]["$ref"].removeprefix("#"))["servers"])
    }
    assert received == ours
