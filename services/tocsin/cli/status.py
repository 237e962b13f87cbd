"""``tocsin status``: what an operator on call would otherwise piece together from the
``nats`` CLI (docs/operations.md, "tocsin status and the nats CLI"), in one summary.

It reads, and changes nothing:

- the four streams (``ALERTS``, ``INGEST``, ``INGEST_DLQ``, ``DEVICES``, each with the
  namespace prefix of :class:`tocsin.core.naming.Names`): ``$JS.API.STREAM.INFO``;
- the device queues, the durable consumers on ``ALERTS``: ``$JS.API.CONSUMER.LIST``;
- the latest dead letters: ``$JS.API.STREAM.MSG.GET`` from the last sequence down;
- every gateway's stats: one request on ``Names.gateways_stats_subject`` with a reply
  inbox, every answer gathered until a short deadline (no answer is a finding, not an
  error).

``--json`` prints :func:`collect`'s document; its keys are stable (``schema`` says which
version; keys may be added, never renamed). Times are UTC, ISO 8601 with milliseconds and
a ``Z``; absent values are ``null``. Exit 0 when the summary was printed, whatever it says;
1 when NATS or JetStream cannot be reached; 2 for bad settings or flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from tocsin.core.naming import ERRORS_HEADER, REASON_HEADER, Names
from tocsin.core.settings import Settings, exit_on_bad_settings

from .common import Fail, connect_once, nats_urls

if TYPE_CHECKING:  # nats loads when the command runs, not with the parser
    from nats.aio.client import Client

#: The version of the ``--json`` document's shape.
SCHEMA = "tocsin.status/1"
#: How long the gateways have to answer, by default (seconds).
GATEWAY_WAIT = 1.0
#: Devices listed by default (``--top``).
TOP = 10
#: Dead letters shown (the latest ones).
LATEST_DEAD_LETTERS = 5
#: One JetStream API call may take this long (seconds).
API_TIMEOUT = 5.0
#: JetStream's "stream not found".
STREAM_NOT_FOUND = 10059
#: The streams, in the order status shows them: (key in the document, Names attribute).
STREAMS = (
    ("alerts", "alerts_stream"),
    ("ingest", "ingest_stream"),
    ("dlq", "dlq_stream"),
    ("devices", "devices_stream"),
    ("alert_index", "index_stream"),
    ("push_dlq", "push_dlq_stream"),
)
_JS_API = "$JS.API"


# --------------------------------------------------------------------------- reading


def _time(text: object) -> str | None:
    """A JetStream RFC 3339 time (nanoseconds, any offset) as ``...T..:..:..mmmZ`` UTC;
    None for JetStream's "never" (``0001-01-01T00:00:00Z``)."""
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    return _iso(_parse(text))


def _parse(text: str) -> datetime:
    main, _, rest = text.replace("z", "Z").partition(".")
    if rest:  # fraction, then Z or an offset: Python takes at most 6 digits
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{main}.{rest[:digits][:6].ljust(6, '0')}{rest[digits:]}"
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _iso(when: datetime) -> str:
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _api(nc: Client, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JetStream API request, its JSON answer (an ``error`` object included)."""
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    payload = json.dumps(body).encode() if body else b""
    try:
        msg = await nc.request(subject, payload, timeout=API_TIMEOUT)
    except NoRespondersError:
        raise Fail(
            f"JetStream does not answer on {_where(nc)}: is it enabled (nats-server -js)?"
        ) from None
    except NatsTimeout:
        raise Fail(f"JetStream did not answer {subject} within {API_TIMEOUT:g}s") from None
    answer = json.loads(msg.data or b"{}")
    return answer if isinstance(answer, dict) else {}


def _where(nc: Client) -> str:
    uri = nc.connected_url
    return "NATS" if uri is None else f"{uri.scheme}://{uri.hostname}:{uri.port}"


def _api_error(answer: dict[str, Any]) -> Fail:
    error = answer["error"]
    return Fail(f"JetStream: {error.get('description')} (error {error.get('err_code')})")


async def stream_summary(
    nc: Client, name: str, subjects_filter: str | None = None
) -> tuple[dict[str, Any], dict[str, int]]:
    """The summary of one stream, and its subjects' counts (with ``subjects_filter``)."""
    answer = await _api(
        nc,
        f"{_JS_API}.STREAM.INFO.{name}",
        {"subjects_filter": subjects_filter} if subjects_filter else None,
    )
    if "error" in answer:
        if answer["error"].get("err_code") != STREAM_NOT_FOUND:
            raise _api_error(answer)
        empty: dict[str, Any] = dict.fromkeys(
            (
                "messages",
                "bytes",
                "first_seq",
                "first_time",
                "last_seq",
                "last_time",
                "consumers",
                "replicas",
                "leader",
            )
        )
        return {"name": name, "exists": False, **empty}, {}
    state = answer.get("state") or {}
    config = answer.get("config") or {}
    messages = int(state.get("messages", 0))
    summary = {
        "name": name,
        "exists": True,
        "messages": messages,
        "bytes": int(state.get("bytes", 0)),
        "first_seq": int(state.get("first_seq", 0)) if messages else None,
        "first_time": _time(state.get("first_ts")) if messages else None,
        "last_seq": int(state.get("last_seq", 0)) or None,
        "last_time": _time(state.get("last_ts")),
        "consumers": int(state.get("consumer_count", 0)),
        "replicas": int(config.get("num_replicas", 1) or 1),
        "leader": (answer.get("cluster") or {}).get("leader"),
    }
    subjects = {str(k): int(v) for k, v in (state.get("subjects") or {}).items()}
    return summary, subjects


async def list_consumers(nc: Client, stream: str) -> tuple[list[dict[str, Any]], int]:
    """Every consumer of ``stream`` as JetStream describes it (paged), and how many the
    server could not describe (a clustered consumer whose leader did not answer)."""
    consumers: list[dict[str, Any]] = []
    missing = 0
    while True:
        answer = await _api(nc, f"{_JS_API}.CONSUMER.LIST.{stream}", {"offset": len(consumers)})
        if "error" in answer:
            if answer["error"].get("err_code") == STREAM_NOT_FOUND:
                return [], 0
            raise _api_error(answer)
        page = answer.get("consumers") or []
        consumers.extend(page)
        missing = len(answer.get("missing") or ())
        if not page or len(consumers) >= int(answer.get("total", 0)):
            return consumers, missing


def device_of(names: Names, info: dict[str, Any]) -> tuple[str, str] | None:
    """(user, client_id) of a device queue, or None for any other consumer."""
    metadata = (info.get("config") or {}).get("metadata")
    return names.device_of(
        str(info.get("name", "")), metadata if isinstance(metadata, dict) else None
    )


def _last_active(info: dict[str, Any]) -> str | None:
    """The later of the last delivery and the last ack."""
    times = [
        _time((info.get(part) or {}).get("last_active")) for part in ("delivered", "ack_floor")
    ]
    known = [t for t in times if t is not None]
    return max(known) if known else None  # same format throughout: text order is time order


def device_queues(
    names: Names, stream: str, consumers: list[dict[str, Any]], missing: int, top: int
) -> dict[str, Any]:
    devices: list[dict[str, Any]] = []
    for info in consumers:
        device = device_of(names, info)
        if device is None:
            continue
        waiting = int(info.get("num_pending") or 0)
        unacked = int(info.get("num_ack_pending") or 0)
        devices.append(
            {
                "user": device[0],
                "client_id": device[1],
                "consumer": str(info.get("name")),
                "pending_total": waiting + unacked,
                "num_pending": waiting,
                "num_ack_pending": unacked,
                "last_active": _last_active(info),
                "gateway": None,
            }
        )
    devices.sort(key=lambda d: (-d["pending_total"], d["user"], d["client_id"]))
    return {
        "stream": stream,
        "devices": len(devices),
        "devices_with_pending": sum(1 for d in devices if d["pending_total"]),
        "pending_total": sum(d["pending_total"] for d in devices),
        "num_pending": sum(d["num_pending"] for d in devices),
        "num_ack_pending": sum(d["num_ack_pending"] for d in devices),
        "other_consumers": len(consumers) - len(devices),
        "unlisted_consumers": missing,
        "top": devices[:top],
    }


async def add_records(nc: Client, names: Names, devices: list[dict[str, Any]]) -> None:
    """Complete the listed devices from their records in ``DEVICES``: ``last_active``
    becomes the latest of delivery, ack and record write (a session writes the record when
    it connects, saves a position or closes); ``gateway`` is the instance the record says
    holds the device (None: nobody; after a gateway's crash it may still name that one)."""
    from nats.js.errors import NotFoundError

    js = nc.jetstream(timeout=API_TIMEOUT)
    for device in devices:
        subject = names.device_record_subject(device["consumer"])
        try:
            msg = await js.get_last_msg(names.devices_stream, subject)
        except NotFoundError:
            continue
        try:
            record = json.loads(msg.data or b"{}")
        except ValueError:
            record = {}
        owned = isinstance(record, dict) and record.get("owner")
        device["gateway"] = record.get("gateway") if owned else None
        written = None if msg.time is None else _iso(msg.time)
        known = [t for t in (device["last_active"], written) if t is not None]
        device["last_active"] = max(known) if known else None


def _errors(text: str | None) -> list[Any] | str | None:
    if text is None:
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return text
    return parsed if isinstance(parsed, list) else text


async def dead_letters(
    nc: Client, names: Names, summary: dict[str, Any], subjects: dict[str, int]
) -> dict[str, Any]:
    """The DLQ's count, its counts by reason and its latest entries, newest first."""
    from nats.js.errors import NotFoundError

    prefix = names.dlq_subject("")
    by_reason: dict[str, int] = {}
    for subject, count in subjects.items():
        reason = subject.removeprefix(prefix) if subject.startswith(prefix) else subject
        by_reason[reason] = by_reason.get(reason, 0) + count
    latest: list[dict[str, Any]] = []
    if summary["exists"] and summary["messages"]:
        js = nc.jetstream(timeout=API_TIMEOUT)
        seq = int(summary["last_seq"])
        first = int(summary["first_seq"])
        tries = 4 * LATEST_DEAD_LETTERS  # deleted messages are gaps: look a little further
        while seq >= first and tries and len(latest) < LATEST_DEAD_LETTERS:
            tries -= 1
            try:
                msg = await js.get_msg(summary["name"], seq)
            except NotFoundError:
                seq -= 1
                continue
            headers = msg.headers or {}
            subject = msg.subject or ""
            latest.append(
                {
                    "seq": msg.seq,
                    "time": None if msg.time is None else _iso(msg.time),
                    "subject": subject,
                    "reason": headers.get(REASON_HEADER) or subject.removeprefix(prefix),
                    "errors": _errors(headers.get(ERRORS_HEADER)),
                    "bytes": len(msg.data or b""),
                }
            )
            seq -= 1
    return {
        "stream": summary["name"],
        "messages": summary["messages"] or 0,
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "latest": latest,
    }


async def push_summary(
    nc: Client, names: Names, streams: dict[str, dict[str, Any]], dlq_subjects: dict[str, int]
) -> dict[str, Any]:
    """Push registrations (devices that registered; a removed one counts until it is
    replaced or ages out) and the push dead letters by kind (notifier/)."""
    registrations = 0
    if streams["devices"]["exists"]:
        _, subjects = await stream_summary(nc, names.devices_stream, names.device_push_all)
        registrations = len(subjects)
    return {
        "registrations": registrations,
        "dlq": {
            "stream": names.push_dlq_stream,
            "messages": streams["push_dlq"]["messages"] or 0,
            "by_kind": {k.rsplit(".", 1)[-1]: n for k, n in sorted(dlq_subjects.items())},
        },
    }


def stopped_tasks(health: dict[str, Any]) -> list[str] | None:
    """The background tasks a gateway says are not running ([]: all run; None: it does not
    say). ``background_tasks_running`` is one flag, or each task's status by name."""
    tasks = health.get("background_tasks_running")
    if isinstance(tasks, bool):
        return [] if tasks else ["background tasks"]
    if isinstance(tasks, dict):
        return sorted(
            str(name)
            for name, task in tasks.items()
            if (task.get("running") if isinstance(task, dict) else task) is False
        )
    return None


def warnings(doc: dict[str, Any]) -> list[str]:
    """What needs a look, one line each (the wording may change; the keys above do not)."""
    out = [
        f"stream {s['name']} does not exist (tocsin creates it when it starts)"
        for s in doc["streams"].values()
        if not s["exists"]
    ]
    dlq = doc["dlq"]
    if dlq["messages"]:
        out.append(f"{dlq['messages']} dead-lettered event(s) in {dlq['stream']}")
    push_dlq = (doc.get("push") or {}).get("dlq") or {"messages": 0}
    if push_dlq["messages"]:
        out.append(f"{push_dlq['messages']} push(es) dead-lettered in {push_dlq['stream']}")
    gateways = doc["gateways"]
    if gateways.get("no_responders"):
        out.append(f"no gateway answered: none listens on {gateways['subject']}")
    elif not gateways["answered"]:
        out.append(
            f"no gateway answered on {gateways['subject']} within {gateways['wait_seconds']:g}s"
        )
    for reply in gateways["replies"]:
        health = reply.get("system_health") or {}
        instance = reply.get("instance", "?")
        if health.get("nats_connected") is False:
            out.append(f"gateway {instance} is not connected to NATS")
        stopped = stopped_tasks(health)
        if stopped:
            out.append(f"gateway {instance}: background task(s) not running: {', '.join(stopped)}")
        if health.get("shutting_down") is True:
            out.append(f"gateway {instance} is shutting down")
    if gateways["unreadable"]:
        out.append(f"{gateways['unreadable']} gateway answer(s) were not JSON objects")
    return out


async def collect(
    nc: Client,
    names: Names,
    top: int = TOP,
    wait: float = GATEWAY_WAIT,
    expect: int | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> dict[str, Any]:
    """The whole status document (what ``--json`` prints)."""
    from tocsin.gateway.stats import gather_gateways  # nats loads when the command runs

    streams: dict[str, dict[str, Any]] = {}
    dlq_subjects: dict[str, int] = {}
    push_dlq_subjects: dict[str, int] = {}
    for key, attribute in STREAMS:
        name = getattr(names, attribute)
        filters = {"dlq": names.dlq_all, "push_dlq": names.push_dlq_all}
        summary, subjects = await stream_summary(nc, name, filters.get(key))
        streams[key] = summary
        if key == "dlq":
            dlq_subjects = subjects
        if key == "push_dlq":
            push_dlq_subjects = subjects
    consumers, missing = await list_consumers(nc, names.alerts_stream)
    queues = device_queues(names, names.alerts_stream, consumers, missing, top)
    if streams["devices"]["exists"]:
        await add_records(nc, names, queues["top"])
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "generated_at": _iso(now()),
        "namespace": names.namespace,
        "nats": {"url": None if nc.connected_url is None else _where(nc)},
        "streams": streams,
        "device_queues": queues,
        "dlq": await dead_letters(nc, names, streams["dlq"], dlq_subjects),
        "gateways": await gather_gateways(nc, names.gateways_stats_subject, wait, expect),
        "push": await push_summary(nc, names, streams, push_dlq_subjects),
    }
    doc["warnings"] = warnings(doc)
    return doc


# --------------------------------------------------------------------------- printing


def _colour_wanted(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class _Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.colour else text

    def title(self, text: str) -> str:
        return self._wrap("1", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)


def _safe(text: str) -> str:
    """Text as a terminal may print it: a user id or a reason with control characters in it
    must not move the cursor or change colours."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    """Columns two spaces apart; ``right``: the indexes of right-aligned columns."""
    rows = [[_safe(cell) for cell in row] for row in rows]
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = []
    for row in [headers, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _ago(when: str | None, now: datetime) -> str:
    """``3m12s ago``, as ``nats stream ls`` shows times; ``-`` for never."""
    if when is None:
        return "-"
    seconds = int((now - _parse(when)).total_seconds())
    if seconds < 0:
        return "just now"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{v}{u}" for v, u in parts if v][:2] or ["0s"]
    return "".join(shown) + " ago"


def _n(value: object) -> str:
    return "-" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _detail(errors: object) -> str:
    if isinstance(errors, str):
        text = errors
    elif isinstance(errors, list) and errors:
        first = errors[0]
        if isinstance(first, dict):
            field, message = first.get("field"), first.get("message")
            text = f"{field}: {message}" if field else str(message)
        else:
            text = str(first)
        if len(errors) > 1:
            text += f" (+{len(errors) - 1} more)"
    else:
        return ""
    return text if len(text) <= 90 else text[:89] + "…"


def _flag(value: object) -> str:
    return "ok" if value is True else "DOWN" if value is False else "-"


def _tasks(health: dict[str, Any]) -> str:
    stopped = stopped_tasks(health)
    return "-" if stopped is None else "ok" if not stopped else "DOWN: " + ",".join(stopped)


def _number(value: object, unit: str = "") -> str:
    if isinstance(value, bool) or value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}{unit}"
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return str(value)


def render(doc: dict[str, Any], colour: bool = False) -> str:
    """The human summary of :func:`collect`'s document."""
    style = _Style(colour)
    now = _parse(doc["generated_at"])
    ns = doc["namespace"]
    where = doc["nats"]["url"] or "NATS"
    scope = f'namespace "{ns}"' if ns else "no namespace"
    out = [style.title("tocsin status") + f"  {scope} · {where} · {doc['generated_at']}"]
    for line in doc["warnings"]:
        out.append(style.warn(_safe(f"! {line}")))

    out += ["", style.title("Streams")]
    rows = []
    for s in doc["streams"].values():
        if not s["exists"]:
            rows.append([s["name"], "missing", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                s["name"],
                _n(s["messages"]),
                _bytes(s["bytes"]),
                _n(s["first_seq"]),
                _ago(s["first_time"], now),
                _n(s["last_seq"]),
                _ago(s["last_time"], now),
                _n(s["consumers"]),
            ]
        )
    headers = ["stream", "messages", "bytes", "first seq", "first msg", "last seq", "last msg"]
    out += _table([*headers, "consumers"], rows, {1, 2, 3, 5, 7})

    push = doc.get("push")  # documents of earlier versions have none
    if push:
        kinds = ", ".join(f"{k} {_n(n)}" for k, n in push["dlq"]["by_kind"].items())
        out += [
            "",
            style.title("Push")
            + f"  {_n(push['registrations'])} registration(s) · {_n(push['dlq']['messages'])} in"
            f" {push['dlq']['stream']}" + (f" ({kinds})" if kinds else ""),
        ]

    q = doc["device_queues"]
    out += [
        "",
        style.title("Device queues")
        + f"  {_n(q['devices'])} devices on {q['stream']} · {_n(q['devices_with_pending'])}"
        f" with alerts queued · {_n(q['pending_total'])} alerts queued"
        f" ({_n(q['num_pending'])} not delivered, {_n(q['num_ack_pending'])} not acked)",
    ]
    if q["unlisted_consumers"]:
        out.append(style.warn(f"  {q['unlisted_consumers']} consumer(s) did not answer"))
    if q["top"]:
        rows = [
            [
                d["user"],
                d["client_id"],
                _n(d["pending_total"]),
                _n(d["num_pending"]),
                _n(d["num_ack_pending"]),
                _ago(d["last_active"], now),
                d["gateway"] or "-",
            ]
            for d in q["top"]
        ]
        out += _table(
            ["user", "client id", "queued", "pending", "ack pending", "last active", "gateway"],
            rows,
            {2, 3, 4},
        )
        if q["devices"] > len(q["top"]):
            out.append(f"  … {q['devices'] - len(q['top'])} more (--top N)")

    d = doc["dlq"]
    reasons = " · ".join(f"{k} {v:,}" for k, v in d["by_reason"].items())
    count = style.warn(_n(d["messages"])) if d["messages"] else "0"
    out += ["", style.title("Dead letters") + f"  {count} in {d['stream']}"]
    out[-1] += f" · {reasons}" if reasons else ""
    if d["latest"]:
        rows = [
            [_n(m["seq"]), _ago(m["time"], now), str(m["reason"]), _detail(m["errors"])]
            for m in d["latest"]
        ]
        out += _table(["seq", "when", "reason", "detail"], rows, {0})

    g = doc["gateways"]
    replies = g["replies"]
    if not replies:
        out += ["", style.title("Gateways") + style.warn("  no gateway answered")]
        if g.get("no_responders"):
            out[-1] += f": none listens on {g['subject']}"
        else:
            out[-1] += f" on {g['subject']} within {g['wait_seconds']:g}s"
    else:
        total = sum(r.get("active_connections") or 0 for r in replies)
        out += [
            "",
            style.title("Gateways")
            + f"  {len(replies)} answered within {g['wait_seconds']:g}s · {total:,} connection"
            + ("" if total == 1 else "s"),
        ]
        rows = []
        for r in replies:
            health = r.get("system_health") or {}
            rows.append(
                [
                    str(r.get("instance", "?")),
                    _number(r.get("active_connections")),
                    _number(r.get("healthy_connections")),
                    _number(r.get("avg_latency_ms"), " ms"),
                    _number(r.get("messages_sent")),
                    _number(r.get("redelivered")),
                    _number(r.get("acks")),
                    _number(r.get("rate_limit_violations")),
                    _flag(health.get("nats_connected")),
                    _tasks(health),
                ]
            )
        out += _table(
            [
                "instance",
                "connections",
                "healthy",
                "latency",
                "sent",
                "redelivered",
                "acks",
                "rate limited",
                "nats",
                "tasks",
            ],
            rows,
            {1, 2, 3, 4, 5, 6, 7},
        )
    if g["unreadable"]:
        out.append(style.warn(f"  {g['unreadable']} answer(s) were not JSON objects"))
    return "\n".join(out)


# --------------------------------------------------------------------------- command


async def _status(settings: Settings, args: argparse.Namespace) -> int:
    nc = await connect_once(nats_urls(settings), settings)
    try:
        doc = await collect(nc, Names(settings.namespace), args.top, args.wait, args.gateways)
    finally:
        await nc.close()
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False), flush=True)
    else:
        print(render(doc, _colour_wanted(sys.stdout)), flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.top < 0:
        raise Fail("--top must be 0 or more", 2)
    if not 0 < args.wait <= 60:
        raise Fail("--wait must be more than 0 and at most 60 seconds", 2)
    if args.gateways is not None and args.gateways < 1:
        raise Fail("--gateways must be 1 or more", 2)
    settings = exit_on_bad_settings()
    if not settings.nats_url:
        raise Fail(
            "TOCSIN_NATS_URL is not set: `tocsin status` reads JetStream and asks the "
            f"gateways over NATS (e.g. TOCSIN_NATS_URL=nats://127.0.0.1:{settings.nats_port}, "
            "where `tocsin run` starts its nats-server)",
            2,
        )
    return asyncio.run(_status(settings, args))
