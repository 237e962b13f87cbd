"""What the ``tocsin`` subcommands share: the clean-exit error, where a client on this
machine reaches the gateway and NATS, the JWT secret, and minting tokens from flags."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tocsin.core.settings import Settings

if TYPE_CHECKING:
    from nats.aio.client import Client

DEV_SECRET_FILE = "dev-secret"
ALERTS_PATH = "/api/v1/alerts"
WS_PATH = ALERTS_PATH + "/ws"
#: Appended when a client cannot reach the gateway.
NOT_RUNNING_HINT = "(is `tocsin run` running? TOCSIN_HTTP_HOST/TOCSIN_HTTP_PORT?)"


class Fail(Exception):
    """A clean exit: ``message`` goes to stderr as one line, ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- addresses


def client_host(host: str) -> str:
    """Where a client on this machine reaches a listener bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def _authority(settings: Settings, port: int | None) -> str:
    return f"{client_host(settings.http_host)}:{settings.http_port if port is None else port}"


def http_base(settings: Settings, port: int | None = None) -> str:
    """The gateway's base URL; ``port`` overrides TOCSIN_HTTP_PORT (``tocsin run`` may pick one)."""
    return f"http://{_authority(settings, port)}"


def ws_url(settings: Settings, port: int | None = None) -> str:
    return f"ws://{_authority(settings, port)}{WS_PATH}"


def nats_urls(settings: Settings) -> list[str]:
    """Where a command on this machine reaches NATS. A URL without credentials to a server
    on this machine gets the operator's from ``tocsin run``'s users file, if there is one
    (``<TOCSIN_DATA_DIR>/nats-users.json``, as the dev JWT secret is found)."""
    from tocsin.core.natsauth import USERS_FILE, load_or_create_passwords, with_user

    urls = list(settings.nats_url) or [f"nats://127.0.0.1:{settings.nats_port}"]
    if not (settings.data_dir / USERS_FILE).is_file():
        return urls
    password = load_or_create_passwords(settings.data_dir)["operator"]
    return [
        with_user(u, "operator", password)
        if urlsplit(u).hostname in ("127.0.0.1", "localhost", "::1") and "@" not in u
        else u
        for u in urls
    ]


# --------------------------------------------------------------------------- JWT secret


def dev_secret_path(data_dir: Path) -> Path:
    return data_dir / DEV_SECRET_FILE


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
    path = dev_secret_path(settings.data_dir)
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


# --------------------------------------------------------------------------- tokens


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


def roles_and_regions(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """``--roles`` and ``--regions`` as checked lists (roles are checked first)."""
    return _check_roles(_csv(args.roles)), _check_regions(_csv(args.regions))


def mint(settings: Settings, user: str, roles: list[str], regions: list[str], ttl: float) -> str:
    from tocsin.core.auth import mint_token

    if not user:
        raise Fail("--user must not be empty", 2)
    return mint_token(resolve_secret(settings), user, roles=roles, regions=regions, ttl_seconds=ttl)


def redact(url: str) -> str:
    """A server URL without its user and password (for messages that say where we looked)."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


async def connect_once(urls: list[str], settings: Settings | None = None) -> Client:
    """One bounded attempt to reach NATS, for a command that does one thing and exits;
    :class:`Fail` (the URLs without credentials) when nobody answers."""
    import nats
    from nats.errors import NoServersError

    from tocsin.core.natsauth import connect_options

    async def quiet(exc: Exception) -> None:  # failures are reported below, once
        return None

    try:
        # max_reconnect_attempts=0 makes nats-py retry the first connect forever: use 1,
        # and bound the whole attempt besides.
        return await asyncio.wait_for(
            nats.connect(
                urls,
                connect_timeout=5,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                error_cb=quiet,
                **(connect_options(settings) if settings is not None else {}),
            ),
            timeout=15,
        )
    except (NoServersError, OSError, TimeoutError) as exc:
        shown = ",".join(redact(u) for u in urls)
        raise Fail(f"cannot connect to NATS {shown}: {exc or type(exc).__name__}") from None
