"""The module map of docs/architecture.md holds: every package of services/tocsin/ imports
only packages to its right in ``LAYERS``, and every ``tocsin.x`` import names a folder or
file of that name in the tree."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "services" / "tocsin"
LAYERS = ["cli", "bench", "notifier", "gateway", "ingest", "cap", "core", "schemas"]


def imports() -> list[tuple[Path, str]]:
    out = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                out.append((path, node.module))
            elif isinstance(node, ast.Import):
                out.extend((path, alias.name) for alias in node.names)
    return [(p, m) for p, m in out if m == "tocsin" or m.startswith("tocsin.")]


def test_imports_go_one_way_down_the_layers() -> None:
    backwards = []
    for path, module in imports():
        parts = path.relative_to(ROOT).parts
        if len(parts) < 2 or module == "tocsin":
            continue  # tocsin/__init__.py and __main__.py are the entry point
        here, there = parts[0], module.split(".")[1]
        if there != here and LAYERS.index(there) < LAYERS.index(here):
            backwards.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not backwards, backwards


def test_every_tocsin_import_is_a_folder_or_file_of_the_tree() -> None:
    missing = []
    for path, module in imports():
        rel = Path(*module.split(".")[1:])
        if not ((ROOT / rel).is_dir() or (ROOT / rel).with_suffix(".py").is_file()):
            parent = (ROOT / rel).parent  # `from tocsin.x import name`: x is the module
            if not ((parent.with_suffix(".py")).is_file() or parent.is_dir()):
                missing.append(f"{path.relative_to(ROOT)}: {module}")
    assert not missing, missing
