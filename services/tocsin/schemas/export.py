"""Write the JSON Schema files of the models (``python -m tocsin.schemas.export [DIR]``).

In a source tree they go to the repository's top-level ``schemas/json/``, where clients in
other languages find them (docs/architecture.md, module map); an installed package has no
such folder and needs ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .alert import Alert
from .frames import client_frame_adapter, server_frame_adapter

#: ``schemas/json/`` of the source tree this module is in (services/tocsin/schemas/).
JSON_DIR = Path(__file__).resolve().parents[3] / "schemas" / "json"


def documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema, generated from the pydantic models."""
    return {
        "alert.json": Alert.model_json_schema(),
        "server-frame.json": server_frame_adapter.json_schema(),
        "client-frame.json": client_frame_adapter.json_schema(),
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
