"""``tocsin run``: an embedded nats-server (unless TOCSIN_NATS_URL), the ingest service and
one gateway as child processes; waits for readiness, prints the banner, and on
SIGINT/SIGTERM or a child's death stops everything within a bounded time."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from tocsin.core.settings import Settings, exit_on_bad_settings

from .banner import print_banner
from .common import Fail, dev_secret_path, ensure_dev_secret, http_base

#: How long ``tocsin run`` waits for the gateway's /readyz before giving up.
READY_TIMEOUT = 60.0
#: Extra seconds a child gets beyond TOCSIN_SHUTDOWN_GRACE_SECONDS before it is killed.
STOP_MARGIN = 5.0


class _StopRequest:
    """Set by SIGINT/SIGTERM; the supervisor loop polls it."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _readyz(url: str) -> tuple[int | None, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, str(exc)


def _any_exited(children: dict[str, subprocess.Popen[bytes]], how: str) -> bool:
    """Say which children have exited (``how``: when, in words); True if any has."""
    dead = [(n, p.returncode) for n, p in children.items() if p.poll() is not None]
    for name, code in dead:
        print(
            f"tocsin: the {name} exited {how} (code {code}); stopping the rest",
            file=sys.stderr,
            flush=True,
        )
    return bool(dead)


def _stop_children(children: dict[str, subprocess.Popen[bytes]], grace: float) -> None:
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for name, proc in children.items():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(
                f"tocsin: the {name} did not stop within {grace:.0f}s; killing it",
                file=sys.stderr,
                flush=True,
            )
            proc.kill()
            proc.wait()


def _apply_topology(settings: Settings, urls: list[str], replicas: int) -> None:
    import asyncio

    import nats

    from tocsin.core.naming import Names
    from tocsin.core.topology import apply_topology

    async def apply() -> None:
        nc = await nats.connect(urls, connect_timeout=5, max_reconnect_attempts=3)
        try:
            await apply_topology(
                nc.jetstream(),
                settings.model_copy(update={"replicas": replicas}),
                Names(settings.namespace),
                deadline_seconds=READY_TIMEOUT,
            )
        finally:
            await nc.close()

    try:
        asyncio.run(apply())
    except Exception as exc:
        raise Fail(f"could not create the streams on the embedded NATS: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from tocsin.core.embedded import NatsCluster, NatsServer, free_port

    stop = _StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    settings = exit_on_bad_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port = settings.http_port or free_port(settings.http_host or "127.0.0.1")
    if _port_in_use(settings.http_host, http_port):
        raise Fail(
            f"TOCSIN_HTTP_PORT {http_port} on {settings.http_host} is already in use; "
            "stop what listens there or set TOCSIN_HTTP_PORT to a free port",
            2,
        )

    nats: NatsServer | NatsCluster | None = None
    replicas = settings.replicas
    children: dict[str, subprocess.Popen[bytes]] = {}
    failed = False
    try:
        if settings.nats_url:
            nats_url = ",".join(settings.nats_url)
            nats_note = "external, from TOCSIN_NATS_URL"
        else:
            if settings.nats_port == http_port:
                raise Fail(
                    f"TOCSIN_NATS_PORT and TOCSIN_HTTP_PORT are both {http_port}; "
                    "the embedded nats-server and the gateway need ports of their own",
                    2,
                )
            if settings.nats_port and _port_in_use("127.0.0.1", settings.nats_port):
                raise Fail(
                    f"TOCSIN_NATS_PORT {settings.nats_port} is already in use (another "
                    "nats-server?); set TOCSIN_NATS_PORT to a free port, or TOCSIN_NATS_URL "
                    "to use that server",
                    2,
                )
            max_consumers = max(100_000, settings.max_devices + 64)
            if settings.cluster > 1:
                nats = NatsCluster(
                    store_dir=data_dir / f"nats-cluster{settings.cluster}",
                    size=settings.cluster,
                    first_port=settings.nats_port,
                    max_consumers=max_consumers,
                )
                where = f"{nats.store_dir}/n1..n{settings.cluster}"
                print(
                    f"tocsin: starting a {settings.cluster}-node nats-server cluster "
                    f"(JetStream data and logs in {where})",
                    flush=True,
                )
                logs = f"{nats.store_dir}/n*.log"
            else:
                nats = NatsServer(
                    store_dir=data_dir / "nats",
                    port=settings.nats_port,
                    log_file=data_dir / "nats-server.log",
                    max_consumers=max_consumers,
                )
                print(
                    f"tocsin: starting nats-server (JetStream data in {nats.store_dir})",
                    flush=True,
                )
                logs = str(nats.log_file)
            try:
                nats.start()
            except (TimeoutError, FileNotFoundError, RuntimeError) as exc:
                raise Fail(f"nats-server did not start: {exc} (see {logs})") from None
            nats_url = nats.url
            pids = ", ".join(str(pid) for pid in nats.pids)
            nats_note = f"embedded, pid {pids}, log {logs}"
            if settings.cluster > 1 and "TOCSIN_REPLICAS" not in os.environ:
                replicas = 3  # a cluster is for surviving a node: streams at R3

        if settings.jwt_secret:
            secret = settings.jwt_secret
            secret_note = "from TOCSIN_JWT_SECRET"
        else:
            secret_path = dev_secret_path(data_dir)
            secret, created = ensure_dev_secret(secret_path)
            secret_note = f"{'generated, ' if created else ''}saved in {secret_path}"
            print(f"tocsin: dev JWT secret ({secret_note}): {secret}", flush=True)

        env = dict(os.environ)
        env.update(
            {
                "TOCSIN_NATS_URL": nats_url,
                "TOCSIN_JWT_SECRET": secret,
                "TOCSIN_HTTP_PORT": str(http_port),
                "TOCSIN_DATA_DIR": str(data_dir),
                "TOCSIN_REPLICAS": str(replicas),
            }
        )
        if nats is not None and not stop:
            # The streams first, from here: on a cluster, the ingest service and the
            # gateway creating the same stream at once each wait out a request timeout
            # (measured: 10 s longer start-up); updating existing ones together is fast.
            _apply_topology(settings, nats.urls, replicas)
        for name in ("ingest", "gateway"):
            if stop:
                break
            children[name] = subprocess.Popen(
                [sys.executable, "-m", "tocsin", name],
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

        # Wait for the gateway to be ready: connected to NATS, streams present.
        ready_url = http_base(settings, http_port) + "/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        ready = False
        last = ""
        while not stop and not ready:
            if _any_exited(children, "during start-up"):
                failed = True
                break
            status, last = _readyz(ready_url)
            if status == 200:
                ready = True
                break
            if time.monotonic() > deadline:
                print(
                    f"tocsin: the gateway was not ready after {READY_TIMEOUT:.0f}s "
                    f"({ready_url}: {last.strip()}); stopping",
                    file=sys.stderr,
                    flush=True,
                )
                failed = True
                break
            time.sleep(0.1)

        if ready and not stop:
            print_banner(settings, http_port, nats_url, nats_note, secret_note)

        while ready and not stop:
            if _any_exited(children, "unexpectedly"):
                failed = True
                break
            time.sleep(0.2)

        if stop:
            print(
                f"tocsin: {signal.Signals(stop.signal or signal.SIGINT).name}: stopping", flush=True
            )
    finally:
        _stop_children(children, settings.shutdown_grace_seconds + STOP_MARGIN)
        if nats is not None:
            nats.stop()
        if children or nats is not None:
            print("tocsin: stopped" + (" after a failure" if failed else ""), flush=True)
    return 1 if failed else 0
