"""The ``tocsin`` command: the whole pipeline on one machine, each service, and dev clients.

    tocsin run        embedded nats-server (unless TOCSIN_NATS_URL) + ingest + one gateway
    tocsin gateway    the HTTP/WebSocket gateway (needs TOCSIN_NATS_URL)
    tocsin ingest     the ingest service (needs TOCSIN_NATS_URL)
    tocsin publish    send one alert over HTTP (default) or NATS
    tocsin token      print an HS256 token
    tocsin tail       print the alerts one device receives

Every subcommand reads the same ``TOCSIN_*`` settings (docs/settings.md). The JWT secret
is ``TOCSIN_JWT_SECRET`` or, for development, the one ``tocsin run`` generated and saved
in ``<TOCSIN_DATA_DIR>/dev-secret``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tocsin.core.settings import Settings, exit_on_bad_settings

log = logging.getLogger("tocsin.cli")

DEV_SECRET_FILE = "dev-secret"
#: How long ``tocsin run`` waits for the gateway's /readyz before giving up.
READY_TIMEOUT = 60.0
#: Extra seconds a child gets beyond TOCSIN_SHUTDOWN_GRACE_SECONDS before it is killed.
STOP_MARGIN = 5.0
#: Lifetime of the token ``tocsin tail`` mints for itself (an expired token closes the socket).
TAIL_TOKEN_TTL = 24 * 3600


class Fail(Exception):
    """A clean exit: ``message`` goes to stderr as one line, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- helpers


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a listener bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _http_base(settings: Settings) -> str:
    return f"http://{_client_host(settings.http_host)}:{settings.http_port}"


def _ws_url(settings: Settings) -> str:
    return f"ws://{_client_host(settings.http_host)}:{settings.http_port}/api/v1/alerts/ws"


def _nats_urls(settings: Settings) -> list[str]:
    return list(settings.nats_url) or [f"nats://127.0.0.1:{settings.nats_port}"]


def dev_secret_path(settings: Settings) -> Path:
    return settings.data_dir / DEV_SECRET_FILE


def _read_dev_secret(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    if len(text) < 32:
        raise Fail(f"{path} holds no usable secret (needs 32+ characters); delete it", 2)
    return text


def resolve_secret(settings: Settings) -> str:
    """TOCSIN_JWT_SECRET, else the dev secret ``tocsin run`` saved; else a clear failure."""
    if settings.jwt_secret:
        return settings.jwt_secret
    path = dev_secret_path(settings)
    found = _read_dev_secret(path)
    if found is None:
        raise Fail(
            f"no JWT secret: set TOCSIN_JWT_SECRET, or start `tocsin run` once to create {path}",
            2,
        )
    return found


def ensure_dev_secret(path: Path) -> tuple[str, bool]:
    """The dev secret in ``path`` (mode 0600), generated on first use; (secret, created)."""
    found = _read_dev_secret(path)
    if found is not None:
        return found, False
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another `tocsin run` was quicker: use its secret
        return ensure_dev_secret(path)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret, True


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _csv(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def _check_regions(regions: list[str]) -> list[str]:
    from tocsin.schemas import is_region

    for code in regions:
        if not is_region(code):
            raise Fail(f"--regions: {code!r} is not a region code (e.g. KE or KE-30)", 2)
    return regions


def _check_roles(roles: list[str]) -> list[str]:
    from tocsin.core.auth import Role

    known = [r.value for r in Role]
    for role in roles:
        if role not in known:
            raise Fail(f"--roles: {role!r} is not a role ({', '.join(known)})", 2)
    return roles


def _mint(settings: Settings, user: str, roles: list[str], regions: list[str], ttl: float) -> str:
    from tocsin.core.auth import mint_token

    if not user:
        raise Fail("--user must not be empty", 2)
    return mint_token(resolve_secret(settings), user, roles=roles, regions=regions, ttl_seconds=ttl)


# --------------------------------------------------------------------------- tocsin run


class _StopRequest:
    """Set by SIGINT/SIGTERM; the supervisor loop polls it."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object) -> None:
        if self.signal is None:
            self.signal = signum

    def __bool__(self) -> bool:
        return self.signal is not None


def _readyz(url: str) -> tuple[int | None, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=2) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        return None, str(exc)


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


def _example_env(settings: Settings, http_port: int) -> str:
    """``VAR=value`` prefixes a second terminal needs to reach this instance."""
    env: dict[str, str] = {}
    for name in ("TOCSIN_HTTP_HOST", "TOCSIN_DATA_DIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    if http_port != 8080 or "TOCSIN_HTTP_PORT" in os.environ:
        env["TOCSIN_HTTP_PORT"] = str(http_port)
    return "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())


def _tocsin_command() -> str:
    script = Path(sys.executable).parent / "tocsin"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def cmd_run(args: argparse.Namespace) -> int:
    from tocsin.core.embedded import NatsServer, free_port

    stop = _StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    settings = exit_on_bad_settings()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    host = _client_host(settings.http_host)
    http_port = settings.http_port or free_port(settings.http_host or "127.0.0.1")
    if _port_in_use(settings.http_host, http_port):
        raise Fail(
            f"TOCSIN_HTTP_PORT {http_port} on {settings.http_host} is already in use; "
            "stop what listens there or set TOCSIN_HTTP_PORT to a free port",
            2,
        )

    nats: NatsServer | None = None
    children: dict[str, subprocess.Popen[bytes]] = {}
    failed = False
    try:
        if settings.nats_url:
            nats_url = ",".join(settings.nats_url)
            nats_note = "external, from TOCSIN_NATS_URL"
        else:
            if settings.nats_port and _port_in_use("127.0.0.1", settings.nats_port):
                raise Fail(
                    f"TOCSIN_NATS_PORT {settings.nats_port} is already in use (another "
                    "nats-server?); set TOCSIN_NATS_PORT to a free port, or TOCSIN_NATS_URL "
                    "to use that server",
                    2,
                )
            nats = NatsServer(
                store_dir=data_dir / "nats",
                port=settings.nats_port,
                log_file=data_dir / "nats-server.log",
                max_consumers=max(100_000, settings.max_devices + 64),
            )
            print(f"tocsin: starting nats-server (JetStream data in {nats.store_dir})", flush=True)
            try:
                nats.start()
            except (TimeoutError, FileNotFoundError, RuntimeError) as exc:
                raise Fail(f"nats-server did not start: {exc} (see {nats.log_file})") from None
            nats_url = nats.url
            nats_note = (
                f"embedded, pid {nats.process.pid if nats.process else '?'}, log {nats.log_file}"
            )

        if settings.jwt_secret:
            secret = settings.jwt_secret
            secret_note = "from TOCSIN_JWT_SECRET"
        else:
            secret_path = data_dir / DEV_SECRET_FILE
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
            }
        )
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
        ready_url = f"http://{host}:{http_port}/readyz"
        deadline = time.monotonic() + READY_TIMEOUT
        ready = False
        last = ""
        while not stop and not ready:
            dead = [(n, p.returncode) for n, p in children.items() if p.poll() is not None]
            if dead:
                for name, code in dead:
                    print(
                        f"tocsin: the {name} exited during start-up (code {code}); "
                        "stopping the rest",
                        file=sys.stderr,
                        flush=True,
                    )
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
            _print_banner(settings, host, http_port, nats_url, nats_note, secret_note)

        while ready and not stop:
            dead = [(n, p.returncode) for n, p in children.items() if p.poll() is not None]
            if dead:
                for name, code in dead:
                    print(
                        f"tocsin: the {name} exited unexpectedly (code {code}); stopping the rest",
                        file=sys.stderr,
                        flush=True,
                    )
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


def _print_banner(
    settings: Settings, host: str, port: int, nats_url: str, nats_note: str, secret_note: str
) -> None:
    base = f"http://{host}:{port}"
    cmd = _example_env(settings, port) + _tocsin_command()
    jwt_hint = (
        ""
        if not settings.jwt_secret
        else "\nand with the same TOCSIN_JWT_SECRET in the environment"
    )
    print(
        f"""
tocsin is ready.
  WebSocket   ws://{host}:{port}/api/v1/alerts/ws
  Publish     POST {base}/api/v1/alerts   (or NATS subject ingest.alerts)
  Health      {base}/healthz   {base}/readyz
  NATS        {nats_url}   ({nats_note})
  JWT secret  {secret_note}

In a second terminal, from this directory (the commands live in this project's .venv:
run them as below, or `source .venv/bin/activate` and type `tocsin ...`){jwt_hint}:
  {cmd} tail --user alice --regions KE
  {cmd} publish --region KE-30 --level high --title "Malaria outbreak risk rising" \\
      --message "Risk model predicts a rise in cases"
  {cmd} token --user alice --regions KE

Ctrl-C stops everything.
""",
        flush=True,
    )


# --------------------------------------------------------------------------- services


def _require_nats(settings: Settings, what: str) -> None:
    if not settings.nats_url:
        raise Fail(
            f"TOCSIN_NATS_URL is not set: `tocsin {what}` needs a NATS server "
            "(e.g. nats://127.0.0.1:4222); `tocsin run` sets it for its children",
            2,
        )


def cmd_gateway(args: argparse.Namespace) -> int:
    from aiohttp import web

    settings = exit_on_bad_settings()
    _require_nats(settings, "gateway")
    if not (settings.jwt_secret or settings.jwt_public_key):
        raise Fail(
            "TOCSIN_JWT_SECRET (or TOCSIN_JWT_PUBLIC_KEY) is not set: the gateway "
            "cannot verify tokens without a key",
            2,
        )
    _setup_logging(settings)
    from tocsin.gateway.app import create_app

    app = create_app(settings)
    log.info(
        "gateway listening on http://%s:%s (NATS %s)",
        settings.http_host,
        settings.http_port,
        ",".join(settings.nats_url),
    )
    # run_app turns SIGINT/SIGTERM into a graceful stop: on_shutdown closes the sockets
    # (1001), cleanup saves positions and drains NATS.
    web.run_app(
        app,
        host=settings.http_host,
        port=settings.http_port,
        shutdown_timeout=settings.shutdown_grace_seconds,
        print=None,
        access_log=log if settings.log_level == "DEBUG" else None,
        handle_signals=True,
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    _require_nats(settings, "ingest")
    _setup_logging(settings)
    from tocsin.ingest.app import create_app

    app = create_app(settings, list(settings.nats_url))
    log.info("ingest consuming from NATS %s", ",".join(settings.nats_url))
    # FastStream.run installs SIGINT/SIGTERM handlers that stop the app cleanly.
    asyncio.run(app.run(log_level=logging.getLevelName(settings.log_level)))
    return 0


# --------------------------------------------------------------------------- publish


def _alert_id(text: str | None) -> int | str:
    if text is None:
        return time.time_ns() // 1000
    return int(text) if text.isdigit() else text


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


FLAG_FIELDS = (
    "region",
    "title",
    "message",
    "priority",
    "risk_score",
    "lat",
    "lon",
    "alert_id",
    "expires_in",
)


def build_alert(args: argparse.Namespace) -> dict[str, Any]:
    """The alert JSON object from ``--json`` or from the flags (not yet validated)."""
    if args.json is not None:
        given = [f"--{f.replace('_', '-')}" for f in FLAG_FIELDS if getattr(args, f) is not None]
        if given:
            raise Fail(f"--json takes the whole alert; drop {', '.join(given)}", 2)
        try:
            text = sys.stdin.read() if args.json == "-" else Path(args.json).read_text()
        except OSError as exc:
            raise Fail(f"--json: cannot read {args.json}: {exc.strerror}", 2) from None
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Fail(f"--json: not JSON: {exc}", 2) from None
        if not isinstance(body, dict):
            raise Fail("--json: the alert must be a JSON object", 2)
        return body
    if not args.region:
        raise Fail("--region is required (or pass a whole alert with --json FILE|-)", 2)
    now = datetime.now(UTC)
    body: dict[str, Any] = {
        "alert_id": _alert_id(args.alert_id),
        "alert_level": args.level,
        "alert_type": args.type,
        "title": args.title if args.title is not None else f"Test {args.level} alert",
        "message": args.message
        if args.message is not None
        else f"Sent with tocsin publish for {args.region}",
        "location": {"region": args.region},
        "created_at": _iso(now),
    }
    if args.lat is not None:
        body["location"]["lat"] = args.lat
    if args.lon is not None:
        body["location"]["lon"] = args.lon
    if args.priority is not None:
        body["priority"] = args.priority
    if args.risk_score is not None:
        body["risk_score"] = args.risk_score
    if args.expires_in is not None:
        body["expiry_time"] = _iso(now + timedelta(seconds=args.expires_in))
    return body


def validate_alert(body: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from tocsin.schemas import Alert

    try:
        Alert.model_validate(body)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"]) or "alert"
            got = f" (got {err['input']!r})" if err["type"] != "missing" and err["loc"] else ""
            lines.append(f"invalid alert: {field}: {err['msg']}{got}")
        raise Fail("\n".join(lines), 2) from None


async def _publish_http(settings: Settings, args: argparse.Namespace, payload: bytes) -> int:
    import aiohttp

    token = args.token or _mint(settings, "tocsin-cli", ["publisher"], [], 300)
    url = (args.url or _http_base(settings)).rstrip("/") + "/api/v1/alerts"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(url, data=payload, headers=headers) as resp:
                body = (await resp.text()).strip()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Fail(
            f"cannot POST to {url}: {exc or type(exc).__name__} "
            "(is `tocsin run` running? TOCSIN_HTTP_HOST/TOCSIN_HTTP_PORT?)"
        ) from None
    print(body, flush=True)
    if not 200 <= status < 300:
        print(f"tocsin: {url} answered HTTP {status}", file=sys.stderr, flush=True)
        return 1
    return 0


async def _publish_nats(settings: Settings, payload: bytes, alert_id: object) -> int:
    import nats
    from nats.errors import NoRespondersError, NoServersError
    from nats.errors import TimeoutError as NatsTimeout

    from tocsin.core.naming import Names

    urls = _nats_urls(settings)
    subject = Names(settings.namespace).ingest_subject

    async def quiet(exc: Exception) -> None:  # failures are reported below, once
        return None

    try:
        nc = await nats.connect(
            urls, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0, error_cb=quiet
        )
    except (NoServersError, OSError, TimeoutError) as exc:
        raise Fail(f"cannot connect to NATS {','.join(urls)}: {exc}") from None
    try:
        ack = await nc.jetstream().publish(subject, payload, timeout=10)
    except NoRespondersError:
        raise Fail(
            f"no JetStream stream captures {subject!r} on {','.join(urls)}: start "
            "tocsin once (the ingest service and the gateway create the streams)"
        ) from None
    except NatsTimeout:
        raise Fail(f"JetStream did not acknowledge the publish to {subject!r}") from None
    finally:
        await nc.close()
    print(json.dumps({"alert_id": alert_id, "stream": ack.stream, "seq": ack.seq}), flush=True)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    body = build_alert(args)
    validate_alert(body)
    settings = exit_on_bad_settings()
    payload = json.dumps(body).encode()
    if args.via == "nats":
        return asyncio.run(_publish_nats(settings, payload, body.get("alert_id")))
    return asyncio.run(_publish_http(settings, args, payload))


# --------------------------------------------------------------------------- token


def cmd_token(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    roles = _check_roles(_csv(args.roles))
    regions = _check_regions(_csv(args.regions))
    if args.ttl <= 0:
        raise Fail("--ttl must be a positive number of seconds", 2)
    print(_mint(settings, args.user, roles, regions, args.ttl), flush=True)
    return 0


# --------------------------------------------------------------------------- tail


def format_frame(frame: dict[str, Any]) -> str:
    if frame.get("type") == "alert" and isinstance(frame.get("alert"), dict):
        alert = frame["alert"]
        region = (alert.get("location") or {}).get("region", "?")
        line = (
            f"alert seq={frame.get('seq')} level={alert.get('alert_level')} "
            f"region={region} type={alert.get('alert_type')} id={alert.get('alert_id')} "
            f"title={json.dumps(alert.get('title'), ensure_ascii=False)}"
        )
        return line + (" (redelivered)" if frame.get("redelivered") else "")
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    import aiohttp

    if args.token:
        token = args.token
    else:
        if not args.user or not args.regions:
            raise Fail("--user and --regions are needed to mint a token (or pass --token)", 2)
        token = _mint(
            settings,
            args.user,
            _check_roles(_csv(args.roles)),
            _check_regions(_csv(args.regions)),
            TAIL_TOKEN_TTL,
        )
    url = args.url or _ws_url(settings)
    params = {"auth_token": token, "client_id": args.client_id, "ack_mode": args.ack_mode}
    seen = 0
    async with aiohttp.ClientSession() as session:
        try:
            ws = await session.ws_connect(url, params=params, autoping=True)
        except aiohttp.WSServerHandshakeError as exc:
            # The refusal's JSON body is not kept by aiohttp: ask again without the upgrade
            # (the handshake checks run before the upgrade, so the answer is the same).
            body = ""
            try:
                async with session.get(url, params=params) as resp:
                    if resp.status == exc.status:
                        body = (await resp.text()).strip()
            except aiohttp.ClientError:
                pass
            if body:
                print(body, flush=True)
            print(
                f"tocsin: {url} refused the WebSocket with HTTP {exc.status}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        except (aiohttp.ClientError, OSError) as exc:
            raise Fail(
                f"cannot connect to {url}: {exc} "
                "(is `tocsin run` running? TOCSIN_HTTP_HOST/TOCSIN_HTTP_PORT?)"
            ) from None
        async with ws:
            async for msg in ws:
                if msg.type is not aiohttp.WSMsgType.TEXT:
                    continue
                try:
                    frame = json.loads(msg.data)
                except json.JSONDecodeError:
                    print(f"(not JSON) {msg.data}", flush=True)
                    continue
                print(format_frame(frame), flush=True)
                kind = frame.get("type")
                if kind == "ping":
                    await ws.send_str(json.dumps({"type": "pong", "ts": frame.get("ts")}))
                elif kind == "alert":
                    if args.ack_mode == "client" and isinstance(frame.get("seq"), int):
                        await ws.send_str(json.dumps({"type": "ack", "seq": frame["seq"]}))
                    seen += 1
                    if args.count and seen >= args.count:
                        await ws.close()
                        return 0
            code = ws.close_code
    print(f"tocsin: connection closed by the server (code {code})", file=sys.stderr, flush=True)
    return 0 if code == 1000 and not args.count else 1


def cmd_tail(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    if args.count is not None and args.count < 1:
        raise Fail("--count must be 1 or more", 2)
    return asyncio.run(_tail(settings, args))


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tocsin",
        description="Durable real-time alert delivery: NATS JetStream in, WebSockets out. "
        "Settings come from TOCSIN_* environment variables (docs/settings.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="embedded nats-server (unless TOCSIN_NATS_URL), the "
        "ingest service and one gateway; Ctrl-C stops everything",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("gateway", help="the HTTP/WebSocket gateway (needs TOCSIN_NATS_URL)")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "ingest", help="the ingest service: ingest.alerts -> ALERTS (needs TOCSIN_NATS_URL)"
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("publish", help="send one alert (HTTP POST by default, or NATS)")
    p.add_argument("--json", metavar="FILE|-", help="a whole alert object from FILE or stdin")
    p.add_argument("--region", help="location.region, e.g. KE-30 (required without --json)")
    p.add_argument("--level", default="high", help="alert_level (default: high)")
    p.add_argument("--type", default="outbreak_risk", help="alert_type (default: outbreak_risk)")
    p.add_argument("--title", help="default: 'Test <level> alert'")
    p.add_argument("--message", help="default: 'Sent with tocsin publish for <region>'")
    p.add_argument("--priority", help="low | normal | high | urgent | emergency")
    p.add_argument("--risk-score", type=float, help="0.0 - 1.0")
    p.add_argument("--lat", type=float)
    p.add_argument("--lon", type=float)
    p.add_argument("--alert-id", help="idempotency key (default: a fresh integer)")
    p.add_argument("--expires-in", type=float, metavar="SECONDS", help="sets expiry_time")
    p.add_argument(
        "--via",
        choices=("http", "nats"),
        default="http",
        help="http: POST /api/v1/alerts with a publisher token (default); "
        "nats: JetStream publish to ingest.alerts",
    )
    p.add_argument(
        "--url", help="gateway base URL (default: http://TOCSIN_HTTP_HOST:TOCSIN_HTTP_PORT)"
    )
    p.add_argument("--token", help="publisher token (default: minted from the secret)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("token", help="print an HS256 token minted with the JWT secret")
    p.add_argument("--user", required=True, help="the sub claim")
    p.add_argument(
        "--roles", default="health_worker", help="comma-separated (default: health_worker)"
    )
    p.add_argument("--regions", default="", help="comma-separated region prefixes, e.g. KE,UG-102")
    p.add_argument(
        "--ttl", type=float, default=3600, metavar="SECONDS", help="lifetime (default: 3600)"
    )
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("tail", help="connect as one device and print every frame")
    p.add_argument("--user", help="the token's sub (with --regions; not needed with --token)")
    p.add_argument("--regions", help="comma-separated region prefixes, e.g. KE")
    p.add_argument(
        "--roles", default="health_worker", help="comma-separated (default: health_worker)"
    )
    p.add_argument("--client-id", default="tail", help="device id (default: tail)")
    p.add_argument(
        "--ack-mode",
        choices=("client", "auto"),
        default="client",
        help="client: ack each alert after printing it (default)",
    )
    p.add_argument(
        "--url",
        help="WebSocket URL (default: ws://TOCSIN_HTTP_HOST:TOCSIN_HTTP_PORT/api/v1/alerts/ws)",
    )
    p.add_argument("--token", help="use this token instead of minting one")
    p.add_argument("--count", type=int, help="exit after N alerts")
    p.set_defaults(func=cmd_tail)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except Fail as exc:
        for line in exc.message.splitlines():
            print(f"tocsin {args.command}: {line}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
