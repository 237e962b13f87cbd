"""clients/python stands alone: it declares aiohttp as its only dependency, and a fresh
virtualenv that holds nothing but the package and aiohttp's own dependencies imports it
(no tocsin, no NATS client, no faststream, no pydantic)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import venv
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "python"
SERVER_SIDE = ("tocsin", "nats", "faststream", "pydantic", "orjson", "jwt")


def closure(name: str) -> set[str]:
    """``name`` and the distributions it needs (extras left out), as installed here."""
    todo, found = [name], set()
    while todo:
        dist = metadata.distribution(todo.pop())
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in found:
            continue
        found.add(key)
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            if "python_version" in req and '< "3.11"' in req.replace("'", '"'):
                continue
            match = re.match(r"[A-Za-z0-9_.-]+", req)
            assert match is not None, req
            todo.append(match[0])
    return found


def import_names(dists: set[str]) -> set[str]:
    names = set()
    for module, owners in metadata.packages_distributions().items():
        if {o.lower().replace("_", "-") for o in owners} & dists:
            names.add(module)
    return names


def test_the_only_declared_dependency_is_aiohttp() -> None:
    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    assert project["name"] == "tocsin-client"
    assert [re.match(r"[a-z0-9_-]+", d)[0] for d in project["dependencies"]] == ["aiohttp"]  # type: ignore[index]
    assert (PACKAGE / "src" / "tocsin_client" / "py.typed").is_file()


def test_a_fresh_venv_with_only_aiohttp_imports_it(tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    python = env / "bin" / "python"
    # aiohttp and what it needs, from this interpreter's site-packages, and nothing more.
    shelf = tmp_path / "aiohttp-only"
    shelf.mkdir()
    deps = closure("aiohttp")
    assert not deps & {"pydantic", "nats-py", "faststream"}, deps
    for module in import_names(deps):
        spec_origin = None
        for base in map(Path, sys.path):
            for candidate in (base / module, base / f"{module}.py"):
                if candidate.exists():
                    spec_origin = candidate
                    break
            if spec_origin:
                break
        if spec_origin is not None:
            (shelf / spec_origin.name).symlink_to(spec_origin)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "tocsin-client.pth").write_text(f"{PACKAGE / 'src'}\n{shelf}\n")
    script = (
        "import sys, tocsin_client as t\n"
        "from tocsin_client import TocsinClient, MemorySeenStore\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_SIDE!r})\n"
        "assert not bad, bad\n"
        "print(t.__version__, t.__file__)\n"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert str(PACKAGE / "src") in out.stdout
    # And the server's packages really are out of reach there.
    probe = subprocess.run(
        [str(python), "-I", "-c", "import pydantic"], capture_output=True, timeout=60
    )
    assert probe.returncode != 0
