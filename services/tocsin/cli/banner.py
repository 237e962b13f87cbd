"""What ``tocsin run`` prints once the gateway is ready: addresses, and commands to paste
into a second terminal that reach this very instance."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from tocsin.core.settings import Settings

from .common import ALERTS_PATH, http_base, ws_url


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


def print_banner(
    settings: Settings,
    port: int,
    nats_url: str,
    nats_note: str,
    secret_note: str,
    ingest_metrics_port: int = 0,
    dev_sign_in: bool = False,
    gateways: list[tuple[str, int, int]] | None = None,
) -> None:
    """``gateways``: (name, pid, own port or 0) of each gateway process."""
    base = http_base(settings, port)
    procs = gateways or []
    if len(procs) > 1:
        own = "   ".join(f"{name} (pid {pid}) {http_base(settings, p)}" for name, pid, p in procs)
        gateways_ = (
            f"\n  Gateways    {len(procs)} processes share port {port} (SO_REUSEPORT: a "
            "connection lands on any one,\n              and so does a scrape of /metrics "
            f"there); each one alone: /metrics, /readyz on\n              {own}"
        )
    else:
        gateways_ = ""
    ingest = (
        f"   ingest: {http_base(settings, ingest_metrics_port)}/metrics"
        if ingest_metrics_port
        else ""
    )
    cmd = _example_env(settings, port) + _tocsin_command()
    jwt_hint = (
        ""
        if not settings.jwt_secret
        else "\nand with the same TOCSIN_JWT_SECRET in the environment"
    )
    sign_in = "development sign-in on" if dev_sign_in else "sign in with a token"
    print(
        f"""
tocsin is ready.
  Browser     {base}/   ({sign_in})   dashboard: {base}/dashboard
  WebSocket   {ws_url(settings, port)}
  Publish     POST {base}{ALERTS_PATH}   (or NATS subject ingest.alerts)
  Health      {base}/healthz   {base}/readyz
  Watch       {base}/metrics{ingest}   stats: {base}/api/v1/alerts/stats   tocsin status{gateways_}
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
