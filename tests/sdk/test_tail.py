"""``tocsin tail`` on the SDK: it keeps its device across a gateway restart (reconnects,
prints every alert once) and stops at once when another connection takes the device."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.supervisor import settings_env
from tocsin_client import TocsinClient

from ..support import DEADLINE, GatewayProcess, alert, append, eventually, token

LONG = 30.0


def alert_ids(text: str) -> list[str]:
    return [
        part.removeprefix("id=")
        for line in text.splitlines()
        if line.startswith("alert ")
        for part in line.split()
        if part.startswith("id=")
    ]


def spawn(argv: list[str], env: dict[str, str], out: Path, err: Path) -> subprocess.Popen[bytes]:
    with open(out, "wb") as o, open(err, "wb") as e:
        return subprocess.Popen(argv, env=env, stdout=o, stderr=e)


async def test_tail_reconnects_across_a_gateway_restart_and_stops_on_4009(
    settings: Settings,
    js: JetStreamContext,
    names: Names,
    gateway_process: Callable[[Settings], GatewayProcess],
    tmp_path: Path,
) -> None:
    proc = gateway_process(settings)
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    argv = [sys.executable, "-m", "tocsin", "tail", "--url", proc.ws_url]
    argv += ["--user", "tailer", "--regions", "KE", "--client-id", "t1"]
    tail = spawn(argv, settings_env(settings), out, err)
    try:
        await eventually(lambda: "connection_established" in out.read_text(), LONG, "tail up")
        first = alert("KE-30")
        await append(js, names, first)
        await eventually(lambda: alert_ids(out.read_text()) == [str(first["alert_id"])])

        proc.stop()
        proc.start()
        proc.wait_up(LONG)
        await eventually(
            lambda: out.read_text().count("connection_established") == 2, LONG, "tail back"
        )
        second = alert("KE-30")
        await append(js, names, second)
        await eventually(lambda: len(alert_ids(out.read_text())) >= 2, LONG, "the second alert")
        assert alert_ids(out.read_text()) == [str(first["alert_id"]), str(second["alert_id"])]
        assert "disconnected" in err.read_text()

        # Another connection of the same device: tail does not fight it (4009, exit 1).
        async with TocsinClient(proc.ws_url, token("tailer"), client_id="t1") as other:
            await other.connected(DEADLINE)
            await eventually(lambda: tail.poll() is not None, LONG, "tail to stop")
        assert tail.returncode == 1
        assert "took over (4009)" in err.read_text()
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
