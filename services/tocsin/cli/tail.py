"""``tocsin tail``: connect as one device and print every frame it receives (an alert as
one summary line, every other frame as its JSON), over the Python SDK (``tocsin_client``):
pings answered, each alert acked once printed, reconnects with backoff.

Filter flags (``--location-regions``, ``--bbox``, ``--near``, ``--location-filter``,
``--risk-threshold``, ``--alert-types``) become connect query parameters, so they replace
the device's stored filters; ``--group``, ``--ungroup`` and ``--clear-filters`` become frames
sent after ``connection_established``. All are checked locally with the gateway's own model
(``tocsin.schemas.subscription``) first, so a bad flag is one line and exit 2, not a refused
handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from tocsin.core.settings import Settings, exit_on_bad_settings

from .common import NOT_RUNNING_HINT, Fail, mint, roles_and_regions, ws_url

#: Lifetime of the token ``tocsin tail`` mints for itself (an expired token closes the socket).
TAIL_TOKEN_TTL = 24 * 3600

#: The flag behind each filter field, for errors (``location_filter.near.lat`` → ``--near``).
_FLAG_OF_FIELD = {
    "location_filter.regions": "--location-regions",
    "location_filter.bbox": "--bbox",
    "location_filter.near": "--near",
    "location_filter": "--location-filter",
    "risk_threshold": "--risk-threshold",
    "alert_types": "--alert-types",
}
_LOCATION_FLAGS = {"regions": "--location-regions", "bbox": "--bbox", "near": "--near"}


@dataclass(frozen=True)
class Subscribing:
    """What the filter flags ask of the gateway."""

    #: Connect query parameters (replace the device's stored filters when non-empty).
    params: dict[str, str]
    #: Groups for one ``subscribe`` frame after ``connection_established``.
    groups: tuple[str, ...] = ()
    #: Send ``update_filters`` with ``{}`` after ``connection_established``.
    clear: bool = False
    #: Groups for one ``unsubscribe`` frame, sent before ``subscribe``.
    ungroups: tuple[str, ...] = ()

    def frames(self) -> list[dict[str, Any]]:
        """The frames to send after connecting, in order; each waits for its answer."""
        out: list[dict[str, Any]] = []
        if self.clear:
            out.append({"type": "update_filters", "filters": {}})
        if self.ungroups:
            out.append({"type": "unsubscribe", "groups": list(self.ungroups)})
        if self.groups:
            out.append({"type": "subscribe", "groups": list(self.groups)})
        return out


def _numbers(flag: str, text: str, names: tuple[str, ...]) -> list[float]:
    parts = text.split(",")
    usage = f"{flag}: expected {','.join(names)} ({len(names)} numbers), got {text!r}"
    if len(parts) != len(names):
        raise Fail(usage, 2)
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise Fail(usage, 2) from None
    if not all(math.isfinite(n) for n in numbers):
        raise Fail(f"{flag}: numbers must be finite, got {text!r}", 2)
    return numbers


def _flag_error(field: str, detail: str, raw_location: bool) -> Fail:
    """A FilterError as one line naming the flag (and the part of it that is wrong)."""
    if raw_location and field.startswith("location_filter"):
        key = "location_filter"
    else:
        keys = [k for k in _FLAG_OF_FIELD if field == k or field.startswith(k + ".")]
        key = max(keys, key=len) if keys else ""
    flag = _FLAG_OF_FIELD.get(key, field)
    if flag == "--location-filter" and not raw_location:  # a rule about the whole object
        flag = "/".join(_LOCATION_FLAGS.values())
    rest = field.removeprefix(key).lstrip(".") if key else ""
    return Fail(f"{flag}: {rest + ': ' if rest else ''}{detail}", 2)


def subscribing(
    args: argparse.Namespace, token_regions: tuple[str, ...] | None = None
) -> Subscribing:
    """Translate and check the filter flags (pure; ``Fail`` with code 2 names the flag).

    ``token_regions``: the regions of a token ``tail`` mints itself, so a ``region:`` group
    outside them is refused here rather than ``denied`` by the gateway; ``None`` = not known
    (``--token``) or all (admin).
    """
    from tocsin.schemas.subscription import (
        MAX_GROUPS,
        FilterError,
        Filters,
        authorize,
        parse_group,
    )

    for flag, value in (
        ("--location-regions", args.location_regions),
        ("--bbox", args.bbox),
        ("--near", args.near),
        ("--location-filter", args.location_filter),
        ("--risk-threshold", args.risk_threshold),
        ("--alert-types", args.alert_types),
    ):
        if value is not None and not value.strip():
            raise Fail(f"{flag}: empty; leave the flag out instead", 2)

    location: dict[str, Any] = {}
    if args.location_regions is not None:
        location["regions"] = [r.strip() for r in args.location_regions.split(",") if r.strip()]
    if args.bbox is not None:
        location["bbox"] = _numbers(
            "--bbox", args.bbox, ("MIN_LON", "MIN_LAT", "MAX_LON", "MAX_LAT")
        )
    if args.near is not None:
        lat, lon, radius = _numbers("--near", args.near, ("LAT", "LON", "RADIUS_KM"))
        location["near"] = {"lat": lat, "lon": lon, "radius_km": radius}
    if args.bbox is not None and args.near is not None:
        raise Fail("--bbox, --near: give one of them, not both", 2)
    if args.location_filter is not None and location:
        used = ", ".join(_LOCATION_FLAGS[k] for k in location)
        raise Fail(f"--location-filter: give it or {used}, not both", 2)

    params: dict[str, str] = {}
    if args.location_filter is not None:
        params["location_filter"] = args.location_filter.strip()
    elif location:
        params["location_filter"] = json.dumps(location, separators=(",", ":"))
    if args.risk_threshold is not None:
        params["risk_threshold"] = args.risk_threshold.strip()
    if args.alert_types is not None:
        params["alert_types"] = args.alert_types.strip()
    try:
        Filters.from_query(params)
    except FilterError as exc:
        raise _flag_error(exc.field, exc.detail, args.location_filter is not None) from None

    if args.clear_filters and params:
        raise Fail("--clear-filters: leave it out with filter flags (they replace the stored)", 2)

    def parsed(flag: str, texts: list[str] | None) -> list[str]:
        out: list[str] = []
        for text in texts or ():
            try:
                group = parse_group(text.strip())
            except ValueError as exc:
                raise Fail(f"{flag}: {exc}", 2) from None
            if str(group) not in out:
                out.append(str(group))
        if len(out) > MAX_GROUPS:
            raise Fail(f"{flag}: at most {MAX_GROUPS} groups, got {len(out)}", 2)
        return out

    groups = parsed("--group", args.group)
    ungroups = parsed("--ungroup", args.ungroup)
    if token_regions is not None:
        _, denied = authorize((parse_group(g) for g in groups), token_regions)
        if denied:
            outside = ", ".join(str(g) for g in denied)
            within = ",".join(token_regions)
            raise Fail(f"--group: {outside}: not within the token's regions ({within})", 2)
    return Subscribing(
        params=params,
        groups=tuple(groups),
        clear=bool(args.clear_filters),
        ungroups=tuple(ungroups),
    )


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


def _stderr(line: str) -> None:
    print(f"tocsin: {line}", file=sys.stderr, flush=True)


async def _tail(settings: Settings, args: argparse.Namespace) -> int:
    """One device over the Python SDK (tocsin_client): it answers pings, acks each alert
    once printed, and reconnects (with the same backoff and close-code rules as any app)."""
    from tocsin_client import (
        HandshakeRefused,
        ProtocolError,
        Replaced,
        TocsinClient,
        TokenSource,
        Unreachable,
    )

    token: TokenSource
    if args.token:
        token = args.token
        wanted = subscribing(args)
    else:
        if not args.user or not args.regions:
            raise Fail("--user and --regions are needed to mint a token (or pass --token)", 2)
        roles, regions = roles_and_regions(args)
        # Check the flags before minting: a bad flag must not wait on a missing secret.
        wanted = subscribing(args, None if "admin" in roles else tuple(regions))
        mint(settings, args.user, roles, regions, TAIL_TOKEN_TTL)  # fails early, before connecting

        def token() -> str:  # a fresh one before the last expires (tail may run for days)
            return mint(settings, args.user, roles, regions, TAIL_TOKEN_TTL)

    url = args.url or ws_url(settings)

    def state(now: str, detail: str) -> None:
        if now == "waiting" and client.connections:
            _stderr(f"disconnected; {detail}")

    client = TocsinClient(
        url,
        token,
        client_id=args.client_id,
        ack_mode=args.ack_mode,
        filters=wanted.params,
        max_failed_attempts=1,  # no gateway at all: say so, do not wait for one
        on_state=state,
    )
    # Frames still to be answered after connecting, in order; each waits for its answer.
    # Alerts before the last answer were judged by the old subscription: printed, not counted.
    setup = wanted.frames()
    expected = [frame["type"] for frame in setup]

    async def send_setup() -> None:
        for frame in setup:
            if frame["type"] == "update_filters":
                await client.update_filters(frame["filters"])
            elif frame["type"] == "unsubscribe":
                await client.unsubscribe(frame["groups"])
            else:
                await client.subscribe(frame["groups"])

    seen = 0
    async with client:
        sender = asyncio.ensure_future(send_setup())
        try:
            async for frame in client.frames():
                print(format_frame(frame), flush=True)
                client.max_failed_attempts = None  # connected once: keep reconnecting
                kind = frame.get("type")
                if kind == "subscription_response" and expected:
                    if frame.get("action") != expected[0]:
                        continue
                    if frame.get("status") != "ok":
                        _stderr(f"{expected[0]} {frame.get('status')}: {frame.get('detail')}")
                        return 1
                    expected.pop(0)
                elif kind == "error" and expected and frame.get("code") != "invalid_ack":
                    # An answer to our frame from a gateway that cannot do it (e.g. too old).
                    _stderr(f"{expected[0]} refused: {frame.get('detail')}")
                    return 1
                elif kind == "alert" and not expected:
                    seen += 1
                    if args.count and seen >= args.count:
                        await client.ack()
                        return 0
        except HandshakeRefused as exc:
            if exc.body:
                print(json.dumps(exc.body, ensure_ascii=False), flush=True)
            _stderr(f"{url} refused the WebSocket with HTTP {exc.status}")
            return 1
        except Unreachable as exc:
            raise Fail(f"cannot connect to {url}: {exc.reason} {NOT_RUNNING_HINT}") from None
        except Replaced:
            _stderr("another connection of this device took over (4009); not reconnecting")
            return 1
        except ProtocolError as exc:
            _stderr(str(exc))
            return 1
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    settings = exit_on_bad_settings()
    if args.count is not None and args.count < 1:
        raise Fail("--count must be 1 or more", 2)
    return asyncio.run(_tail(settings, args))
