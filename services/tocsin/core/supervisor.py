"""Child processes of tocsin: their environment, start, readiness, watch and stop.

One way for ``tocsin run`` (ingest and gateway beside an embedded nats-server), ``tocsin
bench`` (gateway and ceiling) and the tests (gateways killed and restarted in place):

* :func:`settings_env` turns a :class:`Settings` into the environment of a child: this
  process's environment without its ``TOCSIN_*`` variables, then every setting that differs
  from its default as the variable that sets it. A child reads back exactly these settings.
* :class:`Child` spawns a process in its own session (a Ctrl-C on the terminal reaches the
  supervisor only, which stops the children in order), waits for it to be ready while
  watching that it is alive, and stops it: a signal, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from pydantic import BaseModel

from .settings import Settings

#: Readiness and watch loops look this often.
POLL_SECONDS = 0.02


# ----------------------------------------------------------------------- environment
def env_value(value: object) -> str:
    """A setting's value as its environment variable spells it (lists: comma-separated)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(env_value(v) for v in value)
    if isinstance(value, Enum):
        return str(value.value)
    return str(value)


def settings_env(
    settings: Settings,
    overrides: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a child that is to run with ``settings``: ``base`` (default: this
    process's environment) without ``TOCSIN_*``, every non-default setting, ``overrides``."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if not k.startswith("TOCSIN_")}
    defaults = _defaults()
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value is None or (name in defaults and value == defaults[name]):
            continue
        env[f"TOCSIN_{name.upper()}"] = env_value(value)
    env.update(overrides or {})
    return env


def _defaults() -> dict[str, object]:
    out: dict[str, object] = {}
    for name, info in Settings.model_fields.items():
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            out[name] = default.model_dump() if isinstance(default, BaseModel) else default
    return out


def tocsin_argv(*args: str) -> list[str]:
    """``python -m tocsin <args>`` with this interpreter."""
    return [sys.executable, "-m", "tocsin", *args]


def raise_fd_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (a gateway or a load
    generator holding tens of thousands of sockets); the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# ----------------------------------------------------------------------- readiness
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, greeting: bytes | None = None) -> bool:
    """Something accepts connections on ``host:port`` (and, with ``greeting``, its first
    bytes contain it: another process may hold the port)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as conn:
            return greeting is None or greeting in conn.recv(4096)
    except OSError:
        return False


def http_status(url: str, timeout: float = 2) -> tuple[int | None, str]:
    """The status and body of a GET (never through a proxy); None and the reason when there
    is no answer."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, str(exc)


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    alive: subprocess.Popen[bytes] | None = None,
    greeting: bytes | None = None,
) -> None:
    """Wait until ``host:port`` accepts connections. With ``alive``, fail as soon as that
    process exits; with ``greeting``, only a listener whose first bytes contain it counts."""
    deadline = time.monotonic() + timeout
    while not port_open(host, port, greeting):
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(
                f"the process meant to listen on {host}:{port} exited ({alive.returncode})"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
        time.sleep(POLL_SECONDS)


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


def log_tail(path: Path | None, lines: int = 30) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ----------------------------------------------------------------------- children
class ChildFailed(RuntimeError):
    """A child exited, or was not ready in time; the message ends with its log's tail."""


@dataclass
class Child:
    """One child process. ``log``: its output is appended there (None: it shares ours).
    It can be started again after it stopped (same argv, env and log)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Child:
        out: IO[bytes] | None = None
        try:
            if self.log is not None:
                out = open(self.log, "ab")
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        finally:
            if out is not None:
                out.close()
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, ready: Callable[[], bool], timeout: float, what: str = "ready") -> None:
        """Poll ``ready`` until it is true; raise :class:`ChildFailed` if the child exits
        first or ``timeout`` passes (the child is then stopped)."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.running:
                raise ChildFailed(
                    f"the {self.name} exited (code {self.returncode}) before it was {what}"
                    + self._tail()
                )
            if time.monotonic() > deadline:
                self.stop(5)
                raise ChildFailed(
                    f"the {self.name} was not {what} after {timeout:.0f}s" + self._tail()
                )
            time.sleep(POLL_SECONDS)

    def _tail(self) -> str:
        tail = log_tail(self.log)
        return f":\n{tail}" if tail else ""

    def stop(self, timeout: float, sig: int = signal.SIGTERM) -> int | None:
        """``sig``, then SIGKILL after ``timeout``; the exit code (None: never started)."""
        return None if self.proc is None else stop_process(self.proc, timeout, sig)

    def kill(self) -> None:
        """``kill -9``: no goodbye to anyone."""
        self.stop(5, signal.SIGKILL)


def stop_all(
    children: Iterable[Child],
    grace: float,
    on_kill: Callable[[Child], None] | None = None,
) -> None:
    """SIGTERM to every running child at once, then wait for all within one ``grace``;
    those still running are killed (``on_kill`` is told first)."""
    children = list(children)
    for child in children:
        if child.running and child.proc is not None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in children:
        if child.proc is None:
            continue
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if on_kill is not None:
                on_kill(child)
            child.proc.kill()
            child.proc.wait()


def exited(children: Iterable[Child]) -> list[Child]:
    """The children that have exited."""
    return [c for c in children if c.proc is not None and not c.running]
