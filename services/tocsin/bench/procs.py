"""The processes of one benchmark run: nats-server, gateway, ceiling; CPU and memory of each.

Everything runs on loopback on free ports, in a temporary directory, and is stopped at the
end however the run ends. CPU and RSS are read from ``/proc`` (Linux), so every process is
measured from outside, the same way.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tocsin.core.embedded import NatsServer
from tocsin.core.settings import isolated_settings
from tocsin.core.supervisor import (
    Child,
    free_port,
    http_status,
    port_open,
    settings_env,
    stop_all,
    tocsin_argv,
)

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


def _ready(base: str) -> bool:
    return http_status(f"{base}/readyz")[0] == 200


class Stack:
    """nats-server, the gateway (``gateways`` > 1: that many processes sharing one port
    with SO_REUSEPORT, as ``tocsin run`` starts them, each also on a port of its own) and
    the ceiling broadcaster (unless ``ceiling=False``), each its own process."""

    namespace = "bench"

    def __init__(
        self,
        *,
        heartbeat: float,
        max_devices: int,
        max_inflight: int,
        extra_env: dict[str, str] | None = None,
        gateways: int = 1,
        ceiling: bool = True,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tocsin-bench-"))
        self.secret = secrets.token_urlsafe(48)
        self.heartbeat = heartbeat
        self.max_devices = max_devices
        self.max_inflight = max_inflight
        self.extra_env = dict(extra_env or {})
        self.nats: NatsServer | None = None
        self.gateway: Child | None = None  # the first gateway
        self.gateways: list[Child] = []
        self.gateway_count = gateways
        self.own_ports: list[int] = []  # each gateway's own port (gateways > 1)
        self.with_ceiling = ceiling
        self.ceiling: Child | None = None
        self.gateway_port = free_port()
        self.ceiling_port = free_port()

    # ------------------------------------------------------------------ start / stop
    def start(self) -> Stack:
        self.nats = NatsServer(store_dir=self.dir / "nats", port=free_port()).start()
        settings = isolated_settings(
            nats_url=[self.nats.url],
            namespace=self.namespace,
            jwt_secret=self.secret,
            http_host="127.0.0.1",
            http_port=self.gateway_port,
            heartbeat_seconds=self.heartbeat,
            max_devices=self.max_devices,
            max_inflight=self.max_inflight,
            data_dir=self.dir / "data",
            log_level="WARNING",
            shutdown_grace_seconds=30,
            gateways=self.gateway_count,
        )
        env = settings_env(settings, self.extra_env)  # --set: gateway settings to explore
        n = self.gateway_count
        while len(self.own_ports) < (n if n > 1 else 0):
            port = free_port()
            if port not in (self.gateway_port, self.ceiling_port, *self.own_ports):
                self.own_ports.append(port)
        for i in range(n):
            name = "gateway" if n == 1 else f"gateway-{i + 1}"
            own = {"TOCSIN_GATEWAY_METRICS_PORT": str(self.own_ports[i])} if n > 1 else {}
            child = Child(name, tocsin_argv("gateway"), env | own, self.dir / f"{name}.log")
            self.gateways.append(child.start())
        self.gateway = self.gateways[0]
        for child, url in zip(self.gateways, self.gateway_urls, strict=True):
            child.wait_ready(functools.partial(_ready, url), 60, "ready (/readyz)")
        if not self.with_ceiling:
            return self
        argv = ceiling_command("127.0.0.1", self.ceiling_port, self.heartbeat)
        self.ceiling = Child("ceiling", argv, env, self.dir / "ceiling.log").start()
        self.ceiling.wait_ready(lambda: port_open("127.0.0.1", self.ceiling_port), 30, "listening")
        return self

    def stop(self) -> None:
        stop_all([c for c in (self.ceiling, *self.gateways) if c is not None], 60)
        if self.nats is not None:
            # The store is thrown away: a graceful stop costs ~10 ms per consumer (nats 2.15).
            self.nats.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ addresses
    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def gateway_urls(self) -> list[str]:
        """Each gateway's own address (its /metrics, /readyz); the shared one for one."""
        return [f"http://127.0.0.1:{p}" for p in self.own_ports] or [self.http]

    @property
    def ceiling_http(self) -> str:
        return f"http://127.0.0.1:{self.ceiling_port}"

    def pids(self) -> dict[str, int]:
        out = {}
        if self.nats is not None and self.nats.process is not None:
            out["nats-server"] = self.nats.process.pid
        for child in (*self.gateways, self.ceiling):
            if child is not None and child.pid is not None:
                out[child.name] = child.pid
        return out

    def usage(self) -> dict[str, Usage]:
        return {name: usage(pid) for name, pid in self.pids().items()}
