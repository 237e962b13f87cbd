"""Write the JSON Schema files under schemas/json/ (``python -m tocsin.schemas.export``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .alert import Alert
from .frames import client_frame_adapter, server_frame_adapter

JSON_DIR = Path(__file__).parent / "json"


def documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, generated from the pydantic models."""
    return {
        "alert.json": Alert.model_json_schema(),
        "server-frame.json": server_frame_adapter.json_schema(),
        "client-frame.json": client_frame_adapter.json_schema(),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for name, doc in documents().items():
        (JSON_DIR / name).write_text(render(doc), encoding="utf-8")
        print(f"wrote {JSON_DIR / name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
