"""``tocsin publish``: build one alert from flags or ``--json``, check it against the
contract locally, then send it over HTTP (default) or straight to JetStream."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tocsin.core.settings import Settings, exit_on_bad_settings

from .common import ALERTS_PATH, NOT_RUNNING_HINT, Fail, connect_once, http_base, mint, nats_urls

#: Flags that build the alert field by field; ``--json`` excludes them all.
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


def _alert_id(text: str | None) -> int | str:
    if text is None:
        return time.time_ns() // 1000
    return int(text) if text.isdigit() else text


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


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
            given_body: object = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Fail(f"--json: not JSON: {exc}", 2) from None
        if not isinstance(given_body, dict):
            raise Fail("--json: the alert must be a JSON object", 2)
        return given_body
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

    token = args.token or mint(settings, "tocsin-cli", ["publisher"], [], 300)
    url = (args.url or http_base(settings)).rstrip("/") + ALERTS_PATH
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async with session.post(url, data=payload, headers=headers) as resp:
                body = (await resp.text()).strip()
                status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Fail(
            f"cannot POST to {url}: {exc or type(exc).__name__} {NOT_RUNNING_HINT}"
        ) from None
    print(body, flush=True)
    if not 200 <= status < 300:
        print(f"tocsin: {url} answered HTTP {status}", file=sys.stderr, flush=True)
        return 1
    return 0


async def _publish_nats(settings: Settings, payload: bytes, alert_id: object) -> int:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from tocsin.core.naming import Names

    urls = nats_urls(settings)
    subject = Names(settings.namespace).ingest_subject

    nc = await connect_once(urls, settings)
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
