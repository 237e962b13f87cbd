"""The Socket.IO peer of ``tocsin bench``: a Node.js Socket.IO 4 server as a process.

``socketio/server.js`` (committed with its ``package.json`` and lock) is installed on first
use with ``npm ci`` into a folder the bench owns (``.tocsin/bench-socketio`` under the
current directory, git-ignored; ``TOCSIN_BENCH_NODE_DIR`` elsewhere), and started like the
ceiling: its own process on loopback, measured from ``/proc``. Without ``node`` and
``npm`` the peer is skipped and the report says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("socketio")
FILES = ("package.json", "package-lock.json", "server.js")
#: Engine.IO v4 over WebSocket only (no polling first), as the peer is configured.
WS_PATH = "/socket.io/?EIO=4&transport=websocket"


class PeerUnavailable(RuntimeError):
    """The peer cannot run here; the message says why (e.g. "node not found")."""


def install_dir() -> Path:
    return Path(os.environ.get("TOCSIN_BENCH_NODE_DIR", ".tocsin/bench-socketio")).resolve()


def _fingerprint() -> str:
    digest = hashlib.sha256()
    for name in FILES:
        digest.update((SOURCE / name).read_bytes())
    return digest.hexdigest()


def prepare(timeout: float = 600) -> Path:
    """The folder with ``server.js`` and its ``node_modules``, installed if it is not yet
    (or if the committed files changed since). Raises :class:`PeerUnavailable`."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None:
        raise PeerUnavailable("node not found")
    if npm is None:
        raise PeerUnavailable("npm not found")
    target = install_dir()
    stamp = target / ".installed"
    want = _fingerprint()
    if stamp.exists() and stamp.read_text() == want and (target / "node_modules").is_dir():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(SOURCE / name, target / name)
    try:
        subprocess.run(
            [npm, "ci", "--omit=dev", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            check=True,
            timeout=timeout,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or exc.stdout or "").strip()[-500:]
        raise PeerUnavailable(f"npm ci failed: {said}") from exc
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"npm ci took over {timeout:g} s") from exc
    stamp.write_text(want)
    return target


def command(folder: Path, host: str, port: int, ping_seconds: float) -> list[str]:
    node = shutil.which("node") or "node"
    return [
        node,
        str(folder / "server.js"),
        "--host",
        host,
        "--port",
        str(port),
        "--ping-interval",
        f"{ping_seconds:g}",
    ]


def node_version() -> str:
    node = shutil.which("node")
    if node is None:
        return "none"
    out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
    return out.stdout.strip()
