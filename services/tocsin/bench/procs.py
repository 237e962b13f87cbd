"""The processes of one benchmark run: nats-server, gateway, ceiling; CPU and memory of each.

Everything runs on loopback on free ports, in a temporary directory, and is stopped at the
end however the run ends. CPU and RSS are read from ``/proc`` (Linux), so every process is
measured from outside, the same way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tocsin.core.embedded import NatsServer, free_port, stop_process, wait_for_port

from .ceiling import command as ceiling_command

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Usage:
    cpu_seconds: float
    rss_bytes: int


def usage(pid: int) -> Usage:
    """User + system CPU seconds and resident memory of ``pid`` (0s when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        return Usage(cpu, rss)
    except (OSError, ValueError, IndexError):
        return Usage(0.0, 0)


def _get(url: str, timeout: float = 2) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _get(url) != 200:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


class Stack:
    """nats-server, one gateway and the ceiling broadcaster, each its own process."""

    namespace = "bench"

    def __init__(
        self,
        *,
        heartbeat: float,
        max_devices: int,
        max_inflight: int,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tocsin-bench-"))
        self.secret = secrets.token_urlsafe(48)
        self.heartbeat = heartbeat
        self.max_devices = max_devices
        self.max_inflight = max_inflight
        self.extra_env = dict(extra_env or {})
        self.nats: NatsServer | None = None
        self.gateway: subprocess.Popen[bytes] | None = None
        self.ceiling: subprocess.Popen[bytes] | None = None
        self.gateway_port = free_port()
        self.ceiling_port = free_port()

    # ------------------------------------------------------------------ start / stop
    def start(self) -> Stack:
        self.nats = NatsServer(store_dir=self.dir / "nats", port=free_port()).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOCSIN_")}
        env.update(
            {
                "TOCSIN_NATS_URL": self.nats.url,
                "TOCSIN_NAMESPACE": self.namespace,
                "TOCSIN_JWT_SECRET": self.secret,
                "TOCSIN_HTTP_HOST": "127.0.0.1",
                "TOCSIN_HTTP_PORT": str(self.gateway_port),
                "TOCSIN_HEARTBEAT_SECONDS": str(self.heartbeat),
                "TOCSIN_MAX_DEVICES": str(self.max_devices),
                "TOCSIN_MAX_INFLIGHT": str(self.max_inflight),
                "TOCSIN_DATA_DIR": str(self.dir / "data"),
                "TOCSIN_LOG_LEVEL": "WARNING",
                "TOCSIN_SHUTDOWN_GRACE_SECONDS": "30",
            }
        )
        env.update(self.extra_env)  # --set: gateway settings to explore
        self.gateway = self._spawn([sys.executable, "-m", "tocsin", "gateway"], "gateway", env)
        wait_http(f"{self.http}/readyz", self.gateway, self.dir / "gateway.log")
        self.ceiling = self._spawn(
            ceiling_command("127.0.0.1", self.ceiling_port, self.heartbeat), "ceiling", env
        )
        wait_for_port("127.0.0.1", self.ceiling_port, 30)
        return self

    def _spawn(self, argv: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=out, start_new_session=True)

    def stop(self) -> None:
        for proc in (self.ceiling, self.gateway):
            if proc is not None:
                stop_process(proc, 60)
        if self.nats is not None:
            # The store is thrown away: a graceful stop costs ~10 ms per consumer (NATS-NOTES).
            self.nats.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ addresses
    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def ceiling_http(self) -> str:
        return f"http://127.0.0.1:{self.ceiling_port}"

    def pids(self) -> dict[str, int]:
        out = {}
        if self.nats is not None and self.nats.process is not None:
            out["nats-server"] = self.nats.process.pid
        if self.gateway is not None:
            out["gateway"] = self.gateway.pid
        if self.ceiling is not None:
            out["ceiling"] = self.ceiling.pid
        return out

    def usage(self) -> dict[str, Usage]:
        return {name: usage(pid) for name, pid in self.pids().items()}
