"""``tocsin run``: an embedded nats-server (unless TOCSIN_NATS_URL), the ingest service,
``TOCSIN_GATEWAYS`` gateways (one by default; more share the HTTP port with SO_REUSEPORT,
each also on a port of its own) and, with TOCSIN_PUSH_URL, the notifier as child
processes; waits for every one to be ready, prints the banner, and on SIGINT/SIGTERM or a
child's death stops everything within a bounded time."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tocsin.core.embedded import NatsCluster, NatsServer
from tocsin.core.logs import setup_logging
from tocsin.core.naming import Names
from tocsin.core.natsauth import (
    INBOXES,
    USERS_FILE,
    authorization_config,
    load_or_create_passwords,
    with_user,
)
from tocsin.core.settings import Settings, exit_on_bad_settings
from tocsin.core.supervisor import (
    Child,
    free_port,
    http_status,
    settings_env,
    stop_all,
    tocsin_argv,
)

from .banner import print_banner
from .common import Fail, dev_secret_path, ensure_dev_secret, http_base

#: How long ``tocsin run`` waits for the gateway's /readyz before giving up.
READY_TIMEOUT = 60.0
#: Extra seconds a child gets beyond TOCSIN_SHUTDOWN_GRACE_SECONDS before it is killed.
STOP_MARGIN = 5.0
#: How often the running children are looked at.
WATCH_SECONDS = 0.2


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


def _say(message: str, err: bool = False) -> None:
    print(f"tocsin: {message}", file=sys.stderr if err else sys.stdout, flush=True)


def _report_exits(children: list[Child], how: str) -> bool:
    """Say which children have exited (``how``: when, in words); True if any has."""
    dead = [c for c in children if not c.running]
    for child in dead:
        _say(f"the {child.name} exited {how} (code {child.returncode}); stopping the rest", True)
    return bool(dead)


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


@dataclass
class _Nats:
    """Where the children find NATS, and what the banner says about it."""

    url: str
    note: str
    replicas: int
    server: NatsServer | NatsCluster | None = None  # embedded: stopped at the end
    #: embedded: each party's password (core/natsauth.py); external: none (the URL's)
    passwords: dict[str, str] | None = None

    def for_party(self, party: str) -> list[str]:
        """The URLs ``party`` connects with: its user's on the embedded server."""
        urls = self.url.split(",")
        if self.passwords is None:
            return urls
        return [with_user(u, party, self.passwords[party]) for u in urls]


def _gateway_ports(settings: Settings, http_port: int) -> list[int]:
    """Each gateway's own port (/metrics, /readyz, the stats of that process alone): from
    TOCSIN_GATEWAY_METRICS_PORT on, one each; free ones when it is 0 and there are several
    gateways (the shared port answers for one of them at random); none for one gateway."""
    host = settings.http_host or "127.0.0.1"
    first = settings.gateway_metrics_port
    if first:
        ports = [first + i for i in range(settings.gateways)]
        if ports[-1] > 65535 or http_port in ports:
            why = f"include TOCSIN_HTTP_PORT {http_port}"
            if ports[-1] > 65535:
                why = "end above 65535"
            raise Fail(
                f"TOCSIN_GATEWAY_METRICS_PORT {first} with TOCSIN_GATEWAYS "
                f"{settings.gateways}: the gateways' own ports {first}..{ports[-1]} {why}",
                2,
            )
        for port in ports:
            if _port_in_use(settings.http_host, port):
                raise Fail(
                    f"TOCSIN_GATEWAY_METRICS_PORT: port {port} on {settings.http_host} "
                    f"(gateway {port - first + 1} of {settings.gateways}) is already in use; "
                    "set TOCSIN_GATEWAY_METRICS_PORT to the first of free ports, or 0",
                    2,
                )
        return ports
    if settings.gateways == 1:
        return []
    free: list[int] = []
    while len(free) < settings.gateways:
        port = free_port(host)
        if port not in free and port != http_port and port != settings.nats_port:
            free.append(port)
    return free


def gateway_names(count: int) -> list[str]:
    """The children's names: ``gateway`` alone, ``gateway-1`` … ``gateway-N`` for more."""
    return ["gateway"] if count == 1 else [f"gateway-{i + 1}" for i in range(count)]


def _check_ports(settings: Settings) -> int:
    http_port = settings.http_port or free_port(settings.http_host or "127.0.0.1")
    if _port_in_use(settings.http_host, http_port):
        raise Fail(
            f"TOCSIN_HTTP_PORT {http_port} on {settings.http_host} is already in use; "
            "stop what listens there or set TOCSIN_HTTP_PORT to a free port",
            2,
        )
    if settings.nats_url:
        return http_port
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
    return http_port


def _start_nats(settings: Settings, data_dir: Path) -> _Nats:
    """The external NATS of TOCSIN_NATS_URL, or an embedded server (or cluster), started."""
    if settings.nats_url:
        return _Nats(
            ",".join(settings.nats_url), "external, from TOCSIN_NATS_URL", settings.replicas
        )
    max_consumers = max(100_000, settings.max_devices + 64)
    # A user per party with least privilege (docs/security.md): the engine may only publish
    # to ingest.alerts; nothing connects without a password.
    passwords = load_or_create_passwords(data_dir)
    users = authorization_config(Names(settings.namespace), passwords)
    server: NatsServer | NatsCluster
    if settings.cluster > 1:
        server = NatsCluster(
            store_dir=data_dir / f"nats-cluster{settings.cluster}",
            size=settings.cluster,
            first_port=settings.nats_port,
            max_consumers=max_consumers,
            extra_config=users,
        )
        where = f"{server.store_dir}/n1..n{settings.cluster}"
        _say(
            f"starting a {settings.cluster}-node nats-server cluster "
            f"(JetStream data and logs in {where})"
        )
        logs = f"{server.store_dir}/n*.log"
    else:
        server = NatsServer(
            store_dir=data_dir / "nats",
            port=settings.nats_port,
            log_file=data_dir / "nats-server.log",
            max_consumers=max_consumers,
            extra_config=users,
        )
        _say(f"starting nats-server (JetStream data in {server.store_dir})")
        logs = str(server.log_file)
    try:
        server.start()
    except (TimeoutError, FileNotFoundError, RuntimeError) as exc:
        raise Fail(f"nats-server did not start: {exc} (see {logs})") from None
    replicas = settings.replicas
    if settings.cluster > 1 and "TOCSIN_REPLICAS" not in os.environ:
        replicas = 3  # a cluster is for surviving a node: streams at R3
    pids = ", ".join(str(pid) for pid in server.pids)
    note = f"embedded, pid {pids}, log {logs}; users in {data_dir / USERS_FILE}"
    return _Nats(server.url, note, replicas, server, passwords)


def _secret(settings: Settings, data_dir: Path) -> tuple[str, str]:
    """The JWT secret the children use, and where it came from."""
    if settings.jwt_secret:
        return settings.jwt_secret, "from TOCSIN_JWT_SECRET"
    path = dev_secret_path(data_dir)
    secret, created = ensure_dev_secret(path)
    note = f"{'generated, ' if created else ''}saved in {path}"
    _say(f"dev JWT secret ({note}): {secret}")
    return secret, note


def dev_sign_in(settings: Settings, environ: Mapping[str, str]) -> bool:
    """The page's development sign-in: on when this run makes or reuses the dev JWT secret
    (``TOCSIN_JWT_SECRET`` unset) unless ``TOCSIN_DEV_SIGN_IN`` says otherwise; with a
    secret of the deployment, only if asked for (docs/security.md)."""
    if "TOCSIN_DEV_SIGN_IN" in environ:
        return settings.dev_sign_in
    return not settings.jwt_secret


def _await_ready(children: list[Child], urls: list[str], stop: _StopRequest) -> bool:
    """Wait for every gateway's /readyz (connected to NATS, streams present): each on its
    own port when there are several (the shared port answers for any one of them)."""
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = list(urls)
    while not stop:
        if _report_exits(children, "during start-up"):
            return False
        last = ""
        for url in list(waiting):
            status, last = http_status(url)
            if status != 200:
                break
            waiting.remove(url)
        if not waiting:
            return True
        if time.monotonic() > deadline:
            _say(
                f"{len(waiting)} of {len(urls)} gateway(s) not ready after "
                f"{READY_TIMEOUT:.0f}s ({waiting[0]}: {last.strip()}); stopping",
                True,
            )
            return False
        time.sleep(0.1)
    return False


def _watch(children: list[Child], stop: _StopRequest) -> bool:
    """Until a signal (True) or a child's death (False)."""
    while not stop:
        if _report_exits(children, "unexpectedly"):
            return False
        time.sleep(WATCH_SECONDS)
    return True


def cmd_run(args: argparse.Namespace) -> int:
    stop = _StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    settings = exit_on_bad_settings()
    # What the supervisor says itself is printed (_say); this is for what the libraries it
    # uses log (nats-py while the streams are created): the children's format, on stderr.
    setup_logging(settings, service="run")
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    http_port = _check_ports(settings)
    own_ports = _gateway_ports(settings, http_port)
    nats: _Nats | None = None
    children: list[Child] = []
    failed = False
    try:
        nats = _start_nats(settings, data_dir)
        secret, secret_note = _secret(settings, data_dir)
        metrics_port = settings.ingest_metrics_port
        if metrics_port and _port_in_use(settings.http_host, metrics_port):
            taken, metrics_port = metrics_port, free_port(settings.http_host or "127.0.0.1")
            _say(f"TOCSIN_INGEST_METRICS_PORT {taken} is taken; ingest metrics on {metrics_port}")
        resolved = settings.model_copy(
            update={
                "nats_url": nats.url.split(","),
                "jwt_secret": secret,
                "http_port": http_port,
                "data_dir": data_dir,
                "replicas": nats.replicas,
                "ingest_metrics_port": metrics_port,
                "dev_sign_in": dev_sign_in(settings, os.environ),
            }
        )
        if nats.server is not None and not stop:
            # The streams first, from here: on a cluster, the ingest service and the
            # gateway creating the same stream at once each wait out a request timeout
            # (measured: 10 s longer start-up); updating existing ones together is fast.
            _apply_topology(settings, nats.for_party("operator"), nats.replicas)
        # The notifier when there is somewhere to push to; it is a NATS user like ingest
        # (core/natsauth.py).
        # Every gateway: the shared port, and its own one when there are several.
        services: list[tuple[str, str, str, dict[str, object]]] = [
            ("ingest", "ingest", "ingest", {})
        ]
        names = gateway_names(settings.gateways)
        for i, name in enumerate(names):
            port: dict[str, object] = {"gateway_metrics_port": own_ports[i]} if own_ports else {}
            services.append((name, "gateway", "gateway", port))
        if settings.push_url:
            services.append(("notifier", "notifier", "ingest", {}))
        for name, command, party, extra in services:
            if not stop:
                own: dict[str, object] = {"nats_url": nats.for_party(party), **extra}
                if nats.passwords is not None:  # replies to inboxes of its own
                    own["nats_inbox_prefix"] = INBOXES[party]
                env = settings_env(resolved.model_copy(update=own))
                children.append(Child(name, tocsin_argv(command), env).start())
        ready_urls = [f"{http_base(settings, p)}/readyz" for p in own_ports] or [
            http_base(settings, http_port) + "/readyz"
        ]
        ready = not stop and _await_ready(children, ready_urls, stop)
        failed = not stop and not ready
        if ready:
            print_banner(
                settings,
                http_port,
                nats.url,
                nats.note,
                secret_note,
                metrics_port,
                dev_sign_in=resolved.dev_sign_in,
                gateways=[
                    (n, c.pid or 0, p)
                    for n, c, p in zip(
                        names,
                        [c for c in children if c.name in names],
                        own_ports or [0] * len(names),
                        strict=True,
                    )
                ],
            )
            failed = not _watch(children, stop)
        if stop:
            _say(f"{signal.Signals(stop.signal or signal.SIGINT).name}: stopping")
    finally:
        stop_all(
            children,
            settings.shutdown_grace_seconds + STOP_MARGIN,
            lambda c: _say(f"the {c.name} did not stop in time; killing it", True),
        )
        if nats is not None and nats.server is not None:
            nats.server.stop()
        if children or (nats is not None and nats.server is not None):
            _say("stopped" + (" after a failure" if failed else ""))
    return 1 if failed else 0
