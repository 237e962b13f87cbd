"""The ``tocsin`` command: the whole pipeline on one machine, each service, and dev clients.

    tocsin run        embedded nats-server (unless TOCSIN_NATS_URL) + ingest + one gateway
    tocsin gateway    the HTTP/WebSocket gateway (needs TOCSIN_NATS_URL)
    tocsin ingest     the ingest service (needs TOCSIN_NATS_URL)
    tocsin notifier   push notifications to offline devices (needs TOCSIN_PUSH_URL)
    tocsin publish    send one alert over HTTP (default) or NATS
    tocsin token      print an HS256 token
    tocsin tail       print the alerts one device receives
    tocsin status     streams, device queues, dead letters, every gateway's stats
    tocsin ban        list, add or lift the bans every gateway enforces
    tocsin bench      the performance table, beside a bare broadcaster (docs/benchmarks.md),
                      or one focused scenario: tocsin bench <scenario> --help

Every subcommand reads the same ``TOCSIN_*`` settings (docs/settings.md). The JWT secret
is ``TOCSIN_JWT_SECRET`` or, for development, the one ``tocsin run`` generated and saved
in ``<TOCSIN_DATA_DIR>/dev-secret``.

This module only wires argparse to the commands: one module per command (``run``,
``services`` for gateway and ingest, ``publish``, ``token``, ``tail``, ``status``), what
they share in ``common``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .ban import add_parser as add_ban_parser
from .common import Fail, dev_secret_path, ensure_dev_secret, resolve_secret
from .publish import build_alert, cmd_publish, validate_alert
from .run import cmd_run
from .services import cmd_gateway, cmd_ingest, cmd_notifier
from .tail import cmd_tail, format_frame
from .token import cmd_token

__all__ = [
    "Fail",
    "build_alert",
    "build_parser",
    "dev_secret_path",
    "ensure_dev_secret",
    "format_frame",
    "main",
    "resolve_secret",
    "validate_alert",
]


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

    p = sub.add_parser(
        "notifier",
        help="push notifications (FCM HTTP v1) to offline devices (needs TOCSIN_NATS_URL and "
        "TOCSIN_PUSH_URL)",
    )
    p.set_defaults(func=cmd_notifier)

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
    p.add_argument(
        "--count", type=int, help="exit after N alerts (counted once --group etc. are answered)"
    )
    # Filters go in the connect URL, so they replace the device's stored filters.
    p.add_argument(
        "--group",
        action="append",
        metavar="KIND:VALUE",
        help="subscribe after connecting, e.g. region:KE-30, level:high, priority:urgent, "
        "type:outbreak_risk (repeatable; a device's groups are kept across connections)",
    )
    p.add_argument(
        "--ungroup",
        action="append",
        metavar="KIND:VALUE",
        help="unsubscribe from a stored group after connecting, before --group (repeatable)",
    )
    p.add_argument(
        "--location-regions", metavar="R,R", help="location_filter regions, e.g. KE,UG-102"
    )
    p.add_argument(
        "--bbox",
        metavar="MIN_LON,MIN_LAT,MAX_LON,MAX_LAT",
        help="location_filter bbox; min_lon > max_lon wraps the antimeridian, e.g. "
        "--bbox=177,-19,-178,-16",
    )
    p.add_argument(
        "--near", metavar="LAT,LON,RADIUS_KM", help="location_filter near, e.g. -1.29,36.82,50"
    )
    p.add_argument(
        "--location-filter",
        metavar="JSON",
        help="the whole location_filter as JSON (instead of the three flags above)",
    )
    p.add_argument("--risk-threshold", metavar="X", help="0.0 - 1.0 (emergency alerts pass)")
    p.add_argument("--alert-types", metavar="A,B", help="e.g. outbreak_risk,case_cluster")
    p.add_argument(
        "--clear-filters",
        action="store_true",
        help="drop the device's stored filters after connecting",
    )
    # A value like -1.3,36.8,50 is a value, not an unknown option (no flag looks like a number).
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.set_defaults(func=cmd_tail)
    from .status import GATEWAY_WAIT, TOP, cmd_status  # nats loads when the command runs

    p = sub.add_parser(
        "status",
        help="streams, device queues, dead letters and every gateway's stats, in one summary",
        description="Reads JetStream (TOCSIN_NATS_URL) and asks every gateway for its stats "
        "over NATS; changes nothing. The nats CLI commands behind each part: "
        "docs/operations.md, 'tocsin status and the nats CLI'.",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON document (stable keys: docs/operations.md)"
    )
    p.add_argument(
        "--top",
        type=int,
        default=TOP,
        metavar="N",
        help="devices listed, most queued first (default: %(default)s)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=GATEWAY_WAIT,
        metavar="SECONDS",
        help="how long gateways have to answer (default: %(default)s)",
    )
    p.add_argument(
        "--gateways",
        type=int,
        default=None,
        metavar="N",
        help="stop waiting once N gateways answered (default: wait the whole --wait)",
    )
    p.set_defaults(func=cmd_status)

    add_ban_parser(sub)
    from tocsin.bench.scenarios import SCENARIOS  # names and help only: imports nothing heavy

    p = sub.add_parser(
        "bench",
        help="measure connections, broadcast, throughput, targeting, catch-up, memory",
        description="Starts its own nats-server, gateway and ceiling broadcaster on loopback "
        "and drives them from load generator processes; prints the table and writes it as "
        "Markdown, JSON and PNG plots. With a SCENARIO first, runs that focused benchmark "
        "instead, with its own options (tocsin bench SCENARIO --help).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    size.add_argument("--full", action="store_true", help="the sizes of the targets (minutes)")
    p.add_argument("--connections", type=int, help="override the number of held connections")
    p.add_argument("--devices", type=int, help="override the broadcast audience per side")
    p.add_argument("--targeted", type=int, metavar="N", help="override the targeted alerts")
    p.add_argument("--hold", type=float, metavar="SECONDS", help="override the hold phase")
    p.add_argument(
        "--only",
        choices=["targeted"],
        help="targeted: connect, hold and the targeted phase only (no scrapes, broadcast, "
        "sustained or catch-up)",
    )
    p.add_argument(
        "--gateway-code",
        type=Path,
        metavar="DIR",
        help="run the gateway from another tree's services directory (before/after runs)",
    )
    p.add_argument(
        "--out", default="benchmarks/results", help="where results go (default: %(default)s)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample the gateway with py-spy for the whole run (collapsed stacks in --out)",
    )
    p.add_argument(
        "--set",
        action="append",
        metavar="TOCSIN_NAME=VALUE",
        help="a gateway setting for this run, e.g. TOCSIN_CHECKPOINT_SECONDS=60 (repeatable)",
    )
    p.set_defaults(func=_cmd_bench, scenario=None)
    scenarios = p.add_subparsers(
        dest="scenario",
        metavar="[SCENARIO]",
        title="scenarios (each with its own options, after its name)",
    )
    for name, text in SCENARIOS.items():
        # Everything after the name is the scenario's: its own parser reads it (and -h).
        s = scenarios.add_parser(name, help=text, add_help=False, prefix_chars="\0")
        s.add_argument("scenario_argv", nargs=argparse.REMAINDER)
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.scenario is not None:
        given = [
            flag
            for flag, value in (
                ("--quick", args.quick),
                ("--full", args.full),
                ("--connections", args.connections is not None),
                ("--devices", args.devices is not None),
                ("--targeted", args.targeted is not None),
                ("--hold", args.hold is not None),
                ("--only", args.only is not None),
                ("--gateway-code", args.gateway_code is not None),
                ("--out", args.out != "benchmarks/results"),
                ("--profile", args.profile),
                ("--set", args.set),
            )
            if value
        ]
        if given:
            raise Fail(
                f"{', '.join(given)}: options of the table run; a scenario's own options go "
                f"after its name (tocsin bench {args.scenario} --help)",
                2,
            )
        from tocsin.bench.scenarios import run_scenario

        return run_scenario(args.scenario, args.scenario_argv)
    from .bench import cmd_bench  # matplotlib and the load generator load lazily

    return cmd_bench(args)


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
