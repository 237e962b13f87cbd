"""``tocsin bench push``: push notifications to N registered offline devices.

One nats-server, the notifier as a process of its own (``tocsin notifier``), and, in this
process, the FCM stand-in (:mod:`tocsin.bench.pushsink`: the OAuth2 token endpoint and a
recording ``messages:send``). N devices are registered and offline: each has a record
(no owner, floor 0), a device queue on ``ALERTS`` (so the notifier's ack-floor lookup
finds one) and a push registration, written straight to JetStream rather than through N
WebSocket handshakes. Then K alerts are appended one after another, each waited for until
all N pushes arrived.

Measured per alert: pushes/s (N over the span from the first to the last request of that
alert), and the delay from the append to each push request, p50/p99/max, with
``TOCSIN_PUSH_AFTER_SECONDS`` taken off (what the notifier itself adds: planning N jobs,
their round trip through ``PUSH``, the ledger writes, the request); the notifier's and
nats-server's CPU seconds per push. Duplicates and missing pushes are counted (both must
be 0).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from tocsin.bench.procs import usage
from tocsin.bench.pushsink import PushSink
from tocsin.core.auth import Claims
from tocsin.core.naming import Names
from tocsin.core.supervisor import Child, settings_env, tocsin_argv
from tocsin.core.topology import apply_topology
from tocsin.gateway.device import Record
from tocsin.gateway.push import PushRegistrations
from tocsin.gateway.records import DeviceRecords
from tocsin.ingest.pipeline import append_alert
from tocsin.schemas import PushRegistration

from .common import (
    LocalNats,
    code_version,
    cpu_model,
    fmt,
    gateway_settings,
    make_alert,
    new_secret,
    out_option,
    percentile,
    progress,
    run_and_write,
    server_version,
)

#: Writes in flight while setting the devices up.
SETUP_CHUNK = 200
#: How long all N pushes of one alert may take before the run gives up on it.
ALERT_DEADLINE = 300.0


async def _setup(js: Any, names: Names, n: int) -> None:
    registrations = PushRegistrations(js, names)
    records = DeviceRecords(js, names)
    exp = time.time() + 24 * 3600

    async def one(i: int) -> None:
        user = f"d{i:05d}"
        consumer = names.device_consumer(user, "phone")
        await js.add_consumer(
            names.alerts_stream,
            ConsumerConfig(
                durable_name=consumer,
                deliver_policy=DeliverPolicy.NEW,
                ack_policy=AckPolicy.ALL,
                filter_subject=names.region_filters(["KE"])[0],
                inactive_threshold=24 * 3600,
            ),
        )
        record = Record.new(user, "phone").model_copy(update={"floor": 0})
        await records.write(consumer, record, 0)
        claims = Claims(sub=user, exp=exp, regions=("KE",))
        await registrations.put(claims, "phone", PushRegistration(provider="fcm", token=user))

    for i in range(0, n, SETUP_CHUNK):
        await asyncio.gather(*(one(j) for j in range(i, min(n, i + SETUP_CHUNK))))
        if (i // SETUP_CHUNK) % 10 == 0:
            progress(f"push: {min(n, i + SETUP_CHUNK):,}/{n:,} devices set up")


def _failures(log: Path | None) -> dict[str, int]:
    """Failed push attempts in a notifier's log, by reason (its "attempt N failed" lines)."""
    counts: dict[str, int] = {}
    if log is None or not log.exists():
        return counts
    for line in log.read_text(errors="replace").splitlines():
        marker = line.find(" failed (")
        if "push " in line and marker >= 0:
            reason = line[marker + len(" failed (") :].split(")", 1)[0]
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def _pid_usage(child: Child) -> Any:
    assert child.proc is not None
    return usage(child.proc.pid)


async def _ready(js: Any, names: Names, children: list[Child]) -> None:
    """The notifiers' durables exist (the planner starts at the live edge)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await js.consumer_info(names.alerts_stream, names.notifier_consumer)
            await js.consumer_info(names.push_stream, names.push_consumer)
            return
        except NotFoundError:
            if time.monotonic() > deadline or not all(c.running for c in children):
                raise RuntimeError("the notifier did not start (see its log)") from None
            await asyncio.sleep(0.1)


async def _one_alert(
    js: Any,
    names: Names,
    sink: PushSink,
    server_pid: int,
    children: list[Child],
    devices: int,
    after: float,
) -> dict[str, Any]:
    """Append one alert and wait for its N pushes; the row of the table."""
    before_n = sum(_pid_usage(c).cpu_seconds for c in children)
    before_s = usage(server_pid).cpu_seconds
    count = len(sink.pushes)
    alert = make_alert("KE-30", alert_level="critical")
    appended = time.time()
    await append_alert(js, names, alert)
    limit = time.monotonic() + ALERT_DEADLINE + after
    while len(sink.pushes) < count + devices and time.monotonic() < limit:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # a repeat would come right after: counted as a duplicate
    cpu_n = sum(_pid_usage(c).cpu_seconds for c in children) - before_n
    cpu_s = usage(server_pid).cpu_seconds - before_s
    mine = [p for p in sink.pushes[count:] if p.alert_id == str(alert.alert_id)]
    tokens = [p.token for p in mine]
    times = sorted(p.at for p in mine)
    delays = [t - appended - after for t in times]
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    return {
        "pushes": len(mine),
        "duplicates": len(tokens) - len(set(tokens)),
        "missing": devices - len(set(tokens)),
        "pushes_per_s": (len(mine) - 1) / span if span and span > 0 else float("nan"),
        "delay_p50_s": percentile(delays, 50),
        "delay_p99_s": percentile(delays, 99),
        "delay_max_s": max(delays) if delays else float("nan"),
        "notifier_cpu_ms_per_push": cpu_n / max(1, len(mine)) * 1000,
        "nats_cpu_ms_per_push": cpu_s / max(1, len(mine)) * 1000,
    }


async def run(
    devices: int, alerts: int, after: float, concurrency: int, notifiers: tuple[int, ...] = (1,)
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "code": code_version(),
        "nats_server": server_version(),
        "cpu": cpu_model(),
        "devices": devices,
        "alerts": alerts,
        "push_after_seconds": after,
        "push_concurrency": concurrency,
        "notifiers": list(notifiers),
        "per_alert": [],
    }
    work = Path(tempfile.mkdtemp(prefix="tocsin-bench-push-"))
    sink = await PushSink().start()
    running: list[Child] = []
    try:
        with LocalNats() as server:
            namespace = "b" + uuid.uuid4().hex[:8]
            names = Names(namespace)
            settings = gateway_settings(
                server.url,
                namespace,
                new_secret(),
                work,
                push_url=sink.url,
                push_credentials=sink.service_account(work / "service-account.json"),
                push_after_seconds=after,
                push_concurrency=concurrency,
                notifier_metrics_port=0,
                max_devices=devices + 100,
                log_level="INFO",  # each retry's line: counted below
                log_format="json",
            )
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await apply_topology(js, settings, names)
            started = time.monotonic()
            await _setup(js, names, devices)
            out["setup_seconds"] = time.monotonic() - started
            for count in notifiers:
                children = [
                    Child(
                        f"notifier-{count}-{i}",
                        tocsin_argv("notifier"),
                        settings_env(settings),
                        work / f"notifier-{count}-{i}.log",
                    ).start()
                    for i in range(count)
                ]
                running.extend(children)
                await _ready(js, names, children)
                for k in range(alerts):
                    row = await _one_alert(js, names, sink, server.pid, children, devices, after)
                    row |= {"notifiers": count, "alert": k + 1}
                    out["per_alert"].append(row)
                    progress(
                        f"push: {count} notifier(s), alert {k + 1}: {row['pushes']:,} pushes, "
                        f"{fmt(row['pushes_per_s'], 0)}/s, p99 {fmt(row['delay_p99_s'], 2)} s"
                    )
                out["notifier_rss_mib"] = max(_pid_usage(c).rss_bytes for c in children) / 2**20
                for child in children:
                    child.stop(20)
                    running.remove(child)
                    out.setdefault("failed_attempts", {})
                    for reason, n in _failures(child.log).items():
                        key = f"{count} notifier(s): {reason}"
                        out["failed_attempts"][key] = out["failed_attempts"].get(key, 0) + n
            out["tokens_minted"] = len(sink.minted)
            await nc.close()
    finally:
        for child in running:
            child.kill()
        await sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(results: dict[str, Any], when: dt.datetime) -> str:
    lines = [
        f"# tocsin bench push, {when:%Y-%m-%d %H:%M}",
        "",
        f"{results['devices']:,} registered offline devices, {results['alerts']} alerts one "
        "after another with 1, then 2 notifier processes sharing the work "
        f"({results['notifiers']}), TOCSIN_PUSH_AFTER_SECONDS={results['push_after_seconds']:g}, "
        f"TOCSIN_PUSH_CONCURRENCY={results['push_concurrency']}; the notifier in its own "
        "process, the FCM stand-in (token endpoint + recording messages:send, answering at "
        f"once) in the bench process; code {results['code']}, nats-server "
        f"{results['nats_server']}, {results['cpu']}.",
        "",
        "| notifiers | alert | pushes | duplicates | missing | pushes/s | delay beyond "
        "PUSH_AFTER p50 s | p99 s | max s | notifier CPU ms / push | nats-server CPU ms / push |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["per_alert"]:
        lines.append(
            f"| {r['notifiers']} | {r['alert']} | {r['pushes']:,} | {r['duplicates']} | "
            f"{r['missing']} | "
            f"{fmt(r['pushes_per_s'], 0)} | {fmt(r['delay_p50_s'], 2)} | "
            f"{fmt(r['delay_p99_s'], 2)} | {fmt(r['delay_max_s'], 2)} | "
            f"{fmt(r['notifier_cpu_ms_per_push'], 2)} | {fmt(r['nats_cpu_ms_per_push'], 2)} |"
        )
    lines += [
        "",
        "Delay: from just before the append to ALERTS to the push request's arrival at the "
        "endpoint, minus TOCSIN_PUSH_AFTER_SECONDS. pushes/s: the alert's pushes over the "
        f"span of their requests. Setup ({results['setup_seconds']:.0f} s) wrote a record, a "
        "device queue and a registration per device. OAuth2 tokens minted: "
        f"{results['tokens_minted']}; notifier RSS at the end: "
        f"{results['notifier_rss_mib']:.0f} MiB (the largest, last configuration). Failed "
        f"attempts (retried) by reason: {results.get('failed_attempts') or 'none'}; a "
        "duplicate can only follow a timeout (docs/reliability.md, push).",
    ]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Push benchmark: pushes/s to N registered offline devices and the delay "
        "from append to push request (docs/benchmarks.md).",
    )
    parser.add_argument("--devices", type=int, default=10_000, help="default %(default)s")
    parser.add_argument("--alerts", type=int, default=3, help="default %(default)s")
    parser.add_argument(
        "--after", type=float, default=2.0, help="TOCSIN_PUSH_AFTER_SECONDS (default 2)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=64, help="TOCSIN_PUSH_CONCURRENCY (default 64)"
    )
    parser.add_argument(
        "--notifiers",
        default="1,2",
        help="notifier processes, one configuration after another (default %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="500 devices, 2 alerts")
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    devices, alerts = (500, 2) if args.quick else (args.devices, args.alerts)
    if not 1 <= devices <= 50_000:
        parser.error("--devices must be between 1 and 50,000")
    if not 1 <= alerts <= 100:
        parser.error("--alerts must be between 1 and 100")
    if not 0.1 <= args.after <= 60:
        parser.error("--after must be between 0.1 and 60 seconds")
    if not 1 <= args.concurrency <= 1024:
        parser.error("--concurrency must be between 1 and 1024")
    try:
        notifiers = tuple(int(n) for n in args.notifiers.split(","))
    except ValueError:
        parser.error("--notifiers: comma-separated counts, e.g. 1,2")
    if not notifiers or not all(1 <= n <= 8 for n in notifiers):
        parser.error("--notifiers: each between 1 and 8")
    return run_and_write(
        run(devices, alerts, args.after, args.concurrency, notifiers),
        report,
        args.out,
        lambda when: f"push-{when:%Y-%m-%d}" + ("-quick" if args.quick else ""),
    )


if __name__ == "__main__":
    sys.exit(main())
