"""The wheel users install (``pip install .``, not editable): every module of the source
tree, typed (``py.typed``), and requiring no plotting library (that is ``tocsin[bench]``)."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_holds_the_tree_typed_without_plotting_dependencies(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("tocsin-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(zf.read(meta_name))
    source = {
        str(p.relative_to(ROOT / "services"))
        for p in (ROOT / "services" / "tocsin").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert source - names == set(), "modules of services/tocsin/ missing from the wheel"
    assert "tocsin/py.typed" in names
    # The Python SDK ships in it too (`tocsin tail` uses it), typed.
    client = {
        str(p.relative_to(ROOT / "clients" / "python" / "src"))
        for p in (ROOT / "clients" / "python" / "src" / "tocsin_client").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert client and client - names == set(), "tocsin_client missing from the wheel"
    assert "tocsin_client/py.typed" in names
    requires = meta.get_all("Requires-Dist") or []
    always = [r for r in requires if "extra ==" not in r]
    assert always and not any("matplotlib" in r for r in always), always
    assert any("matplotlib" in r and 'extra == "bench"' in r for r in requires), requires
