"""promtool for the tests, from Debian's ``prometheus`` package at a pinned upstream version.

promtool is on no other registry the project reaches (PyPI and npm ship none). The package
is downloaded with ``apt-get download`` and only ``usr/bin/promtool`` is taken out of it, into
the virtualenv (``.venv/opt/promtool-<version>/``, so ``make clean`` removes it); nothing is
installed on the system. A Debian stable release keeps its upstream version for its whole
life and only takes fixes (``+debNuM``), so the pin holds while the mirror serves a
revision of it. On a machine that is not Debian, or a release without a pin, the tests that
need promtool are skipped and say why; every other check of the rules still runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: Upstream version of Debian's ``prometheus`` package, per Debian release. compose.yaml runs
#: Prometheus 3.5; promtool 2.42 knows every rule feature the rules use.
PROMTOOL_DEBIAN = {"bookworm": "2.42.0"}
HOME = Path(sys.prefix) / "opt"


class Unavailable(Exception):
    """promtool cannot be had on this machine (the message says why)."""


def os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v.strip().strip('"') for k, v in pairs}


def debian_revisions(upstream: str) -> list[str]:
    """The versions of ``prometheus`` the apt lists offer for this upstream version."""
    madison = subprocess.run(
        ["apt-cache", "madison", "prometheus"], capture_output=True, text=True, timeout=60
    )
    versions = [line.split("|")[1].strip() for line in madison.stdout.splitlines() if "|" in line]
    return [v for v in versions if re.fullmatch(rf"{re.escape(upstream)}[+-].*", v)]


def fetch(upstream: str, dest: Path) -> None:
    revisions = debian_revisions(upstream)
    if not revisions:
        if os.geteuid() != 0:
            raise Unavailable(f"prometheus {upstream} is not in the apt lists (update needs root)")
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=240)
        revisions = debian_revisions(upstream)
    if not revisions:
        raise LookupError(f"Debian offers no prometheus {upstream}: update PROMTOOL_DEBIAN")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            ["apt-get", "download", "-qq", f"prometheus={revisions[0]}"],
            cwd=tmp,
            check=True,
            timeout=240,
            capture_output=True,
        )
        (deb,) = Path(tmp).glob("prometheus_*.deb")
        tar_path = Path(tmp) / "data.tar"
        with tar_path.open("wb") as out:
            subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, stdout=out)
        with tarfile.open(tar_path) as tar:
            member = tar.extractfile("./usr/bin/promtool")
            assert member is not None
            dest.parent.mkdir(parents=True, exist_ok=True)
            partial = dest.with_name(f".{dest.name}.{os.getpid()}")
            partial.write_bytes(member.read())
    partial.chmod(0o755)
    partial.replace(dest)  # atomic: a concurrent run sees the whole file or none


def promtool() -> Path:
    """The path of the pinned promtool, fetched on first use; Unavailable if it cannot be."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise Unavailable("promtool comes from Debian's prometheus package: no apt-get here")
    codename = os_release().get("VERSION_CODENAME", "")
    upstream = PROMTOOL_DEBIAN.get(codename)
    if upstream is None:
        raise Unavailable(f"no promtool version is pinned for Debian {codename!r}")
    dest = HOME / f"promtool-{upstream}" / "promtool"
    if not dest.exists():
        fetch(upstream, dest)
    version = subprocess.run(
        [str(dest), "--version"], capture_output=True, text=True, check=True, timeout=30
    )
    reported = version.stdout + version.stderr
    if f"promtool, version {upstream}" not in reported:
        raise LookupError(f"{dest}: expected promtool {upstream}, got {reported.splitlines()}")
    return dest
