"""Write the JSON Schema files of the models (``python -m tocsin.schemas.export [DIR]``).

In a source tree they go to the repository's top-level ``schemas/json/``, where clients in
other languages find them (docs/architecture.md, module map); an installed package has no
such folder and needs ``DIR``.

The two directions differ on purpose (docs/protocol.md §2, CONTRACT §8):

* ``client-frame.json`` and ``alert.json`` say exactly what the server **accepts**: closed
  objects (``additionalProperties: false``), a closed union of frame types.
* ``server-frame.json`` says what the server **sends** and leaves room for what a later
  server may add: no ``additionalProperties: false`` anywhere, and the union ends in a
  fallback for a frame ``type`` it does not list (``UnknownFrame``); the ``error`` frame's
  ``code`` may be one it does not list. A field is required
  when the server always sends it; one the server leaves out when it has no value (the
  alert's ``risk_score``, ...) is optional and never ``null``.
* ``filters`` (``update_filters``, and the ``filters`` the server shows in
  ``connection_established`` / ``subscription_response``) is described by the
  ``Filters`` model of ``subscription.py``, with the rules its validators check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel

from .alert import ALERT_TYPE_PATTERN, REGION_PATTERN, Alert
from .frames import ServerFrame, client_frame_adapter, server_frame_adapter
from .subscription import MAX_LIST, Filters

#: ``schemas/json/`` of the source tree this module is in (services/tocsin/schemas/).
JSON_DIR = Path(__file__).resolve().parents[3] / "schemas" / "json"


#: The frames whose ``filters`` field is a ``Filters`` object.
_FILTER_FIELDS = {
    "client": ("UpdateFilters",),
    "server": ("ConnectionEstablished", "SubscriptionResponse"),
}


def filters_defs(server: bool) -> dict[str, Any]:
    """``Filters`` and the definitions it uses, with the rules of its validators."""
    doc = Filters.model_json_schema()
    defs: dict[str, Any] = doc.pop("$defs")
    defs["Filters"] = doc
    doc["description"] = (
        "Filters narrow what a device receives; every key is optional, a key left out is"
        " unset (docs/protocol.md §6)."
    )
    region = {"type": "string", "pattern": REGION_PATTERN}
    names = {"type": "string", "pattern": ALERT_TYPE_PATTERN}
    listed = {"minItems": 1, "maxItems": MAX_LIST}
    location = defs["LocationFilter"]
    _non_null(location["properties"], "regions")["items"] = region
    _non_null(location["properties"], "regions").update(listed)
    location["minProperties"] = 1
    location["not"] = {"required": ["bbox", "near"]}
    location["description"] = "regions and/or one of bbox, near (bbox and near exclude each other)"
    types = _non_null(doc["properties"], "alert_types")
    types.clear()
    types.update({"type": "array", "items": names, **listed})
    if not server:  # the server also takes "a,b" in update_filters
        alternatives = doc["properties"]["alert_types"]["anyOf"]
        alternatives.insert(1, {"type": "string", "description": "comma-separated names"})
    return defs


def _non_null(properties: dict[str, Any], name: str) -> dict[str, Any]:
    """The non-null alternative of an ``X | None`` property."""
    alternatives = properties[name]["anyOf"]
    [schema] = [a for a in alternatives if a != {"type": "null"}]
    assert isinstance(schema, dict)
    return schema


def _with_filters(doc: dict[str, Any], side: str) -> dict[str, Any]:
    defs = doc["$defs"]
    for name, schema in filters_defs(server=side == "server").items():
        assert name not in defs, f"{name}: a frame's definition has that name"
        defs[name] = schema
    for frame in _FILTER_FIELDS[side]:
        prop = defs[frame]["properties"]["filters"]
        for key in ("additionalProperties", "type", "title"):
            prop.pop(key, None)
        prop["$ref"] = "#/$defs/Filters"
    return doc


def _as_sent(schema: Any) -> None:
    """Make a schema of what the server sends: open objects; properties whose default is
    None are optional and not nullable (the server leaves them out), as are the ones marked
    by :func:`_mark_omitted`; every other property is required (the server always writes
    it)."""
    if isinstance(schema, list):
        for item in schema:
            _as_sent(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("additionalProperties") is False:
        del schema["additionalProperties"]
    properties = schema.get("properties")
    if isinstance(properties, dict) and schema.get("type") == "object":
        required = []
        for name, prop in properties.items():
            if prop.pop(_OMITTED, False):
                prop.pop("default", None)
            elif "default" in prop and prop["default"] is None and "anyOf" in prop:
                rest = [a for a in prop.pop("anyOf") if a != {"type": "null"}]
                del prop["default"]
                if len(rest) == 1:
                    prop.update(rest[0])
                else:
                    prop["anyOf"] = rest
            else:
                required.append(name)
                prop.pop("default", None)
        schema["required"] = required
    for key, value in schema.items():
        if key != "properties":
            _as_sent(value)
    if isinstance(properties, dict):
        _as_sent(list(properties.values()))


#: The models of the frames the server sends (the members of the ``ServerFrame`` union).
SERVER_FRAMES: tuple[type[BaseModel], ...] = get_args(get_args(ServerFrame)[0])
#: Marks, for :func:`_as_sent`, a property the server leaves out when it has its default.
_OMITTED = "x-omitted-when-default"


def _mark_omitted(defs: dict[str, Any]) -> None:
    """The fields the server leaves out when they hold their default (``exclude_if``, such
    as the alert's ``msg_type`` and ``references``): optional in what it sends."""
    models: tuple[type[BaseModel], ...] = (Alert, *SERVER_FRAMES)
    for model in models:
        schema = defs.get(model.__name__)
        if schema is None:
            continue
        for name, field in model.model_fields.items():
            if field.exclude_if is not None and name in schema["properties"]:
                schema["properties"][name][_OMITTED] = True


def server_frame_schema() -> dict[str, Any]:
    doc = _with_filters(server_frame_adapter.json_schema(), "server")
    _mark_omitted(doc["$defs"])
    _as_sent(doc["$defs"])
    # A later server may add error codes (docs/protocol.md §4): a client takes any string.
    error = doc["$defs"]["Error"]["properties"]
    error["code"] = {
        "anyOf": [{"$ref": "#/$defs/ErrorCode"}, {"type": "string"}],
        "description": "one of ErrorCode, or a code a later server added",
    }
    known = sorted(doc.pop("discriminator")["mapping"])
    doc["$defs"]["UnknownFrame"] = {
        "type": "object",
        "title": "UnknownFrame",
        "description": "A frame type this version of the schema does not list: a later"
        " server may send it. Clients ignore it (docs/protocol.md §2).",
        "properties": {"type": {"type": "string", "not": {"enum": known}}},
        "required": ["type"],
    }
    doc["oneOf"].append({"$ref": "#/$defs/UnknownFrame"})
    doc["description"] = (
        "A frame the server sends. Open: objects may carry fields not listed here and"
        " the type may be one not listed (UnknownFrame); ignore both."
    )
    return doc


def client_frame_schema() -> dict[str, Any]:
    doc = _with_filters(client_frame_adapter.json_schema(), "client")
    doc["description"] = (
        "A frame the server accepts: exactly these types and fields, of exactly these JSON"
        " types (anything else is answered with an error frame)."
    )
    return doc


def documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, generated from the pydantic models."""
    return {
        "alert.json": Alert.model_json_schema(),
        "server-frame.json": server_frame_schema(),
        "client-frame.json": client_frame_schema(),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tocsin.schemas.export")
    parser.add_argument(
        "out", nargs="?", type=Path, help="folder to write to (default: schemas/json/)"
    )
    args = parser.parse_args(argv)
    out: Path | None = args.out
    if out is None:
        if not JSON_DIR.parent.is_dir():
            parser.error("not in a source tree (no schemas/ folder): give the folder to write to")
        out = JSON_DIR
    out.mkdir(exist_ok=True)
    for name, doc in documents().items():
        (out / name).write_text(render(doc), encoding="utf-8")
        print(f"wrote {out / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
