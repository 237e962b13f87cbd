"""``tocsin bench cap``: what CAP and the alert index cost, measured in one run.

1. The ingest store, on a local nats-server: ``append_alert`` alone (the path before the
   alert index) against ``store_alert`` (append + index), alternating rounds, one alert at a
   time awaited as the ingest service does.
2. CAP in (safe parse, schema, mapping) and CAP out (emit, schema check) per document.
3. The backlog's supersede check per alert (``Supersessions`` look-up on the Nats-Msg-Id
   header), against the same loop without it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
import timeit
from typing import Any

import nats

from tocsin.cap import CapRules, parse_cap, parse_type_rules, to_alert, to_cap
from tocsin.core.alert_index import Supersessions
from tocsin.core.naming import MSG_ID_HEADER, Names
from tocsin.core.settings import isolated_settings
from tocsin.core.topology import apply_topology
from tocsin.ingest.pipeline import append_alert, store_alert, validate_cap

from .common import LocalNats, code_version, make_alert, out_option, run_and_write

RULES = CapRules(parse_type_rules(["Health=outbreak_risk"]))
#: A health alert shaped like the project's test fixture, two info blocks.
DOCUMENT = b"""<?xml version="1.0" encoding="UTF-8"?>
<alert xmlns="urn:oasis:names:tc:emergency:cap:1.2">
  <identifier>KE-MOH-2026-0042</identifier><sender>alerts@health.go.ke</sender>
  <sent>2026-11-25T10:00:00+03:00</sent><status>Actual</status><msgType>Alert</msgType>
  <scope>Public</scope>
  <info><language>sw-KE</language><category>Health</category><event>Kipindupindu</event>
    <urgency>Expected</urgency><severity>Severe</severity><certainty>Likely</certainty>
    <headline>Hatari ya kipindupindu</headline>
    <area><areaDesc>Homa Bay</areaDesc><geocode><valueName>ISO3166-2</valueName>
    <value>KE-30</value></geocode></area></info>
  <info><language>en-KE</language><category>Health</category><event>Cholera</event>
    <responseType>Prepare</responseType><urgency>Expected</urgency><severity>Severe</severity>
    <certainty>Likely</certainty><expires>2099-11-26T10:00:00+03:00</expires>
    <headline>Cholera outbreak risk in Homa Bay</headline>
    <description>Cholera cases have been confirmed in Homa Bay town.</description>
    <instruction>Boil or treat drinking water.</instruction>
    <web>https://health.go.ke/alerts/KE-MOH-2026-0042</web>
    <area><areaDesc>Homa Bay County</areaDesc><circle>-0.5273,34.4571 15</circle>
    <geocode><valueName>ISO3166-2</valueName><value>KE-30</value></geocode></area></info>
</alert>
"""


class _Msg:
    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers


async def run(alerts: int, rounds: int) -> dict[str, Any]:
    store: list[dict[str, Any]] = []
    with LocalNats() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            for rnd in range(rounds):
                for label, fn in (("append", append_alert), ("store", store_alert)):
                    names = Names(f"bcap{rnd}{label}")
                    settings = isolated_settings(namespace=names.namespace)
                    await apply_topology(js, settings, names)
                    batch = [make_alert("KE-30") for _ in range(alerts)]
                    started = time.perf_counter()
                    for alert in batch:
                        await fn(js, names, alert)
                    took = time.perf_counter() - started
                    store.append({"round": rnd, "path": label, "seconds": took, "n": alerts})
        finally:
            await nc.close()
    k = 200
    accepted = frozenset({"outbreak_risk"})
    cap_in = timeit.timeit(lambda: validate_cap(DOCUMENT, accepted, RULES), number=k) / k
    alert, meta = to_alert(parse_cap(DOCUMENT), RULES)
    cap_out = timeit.timeit(lambda: to_cap(alert, meta, RULES), number=k) / k
    index = Supersessions()
    for i in range(10_000):
        index.note(f"cap-{i:032x}", 1_000_000 + i, "x")
    msg = _Msg({MSG_ID_HEADER: "1042"})
    n = 200_000

    def without() -> object:
        return (msg.headers or {}).get(MSG_ID_HEADER)

    def with_check() -> object:
        alert_id = (msg.headers or {}).get(MSG_ID_HEADER)
        return index.superseder(alert_id, 5) if alert_id else None

    base = timeit.timeit(without, number=n) / n
    checked = timeit.timeit(with_check, number=n) / n
    return {
        "commit": code_version(),
        "store": store,
        "cap_in_ms": cap_in * 1e3,
        "cap_out_ms": cap_out * 1e3,
        "backlog_ns": {"without": base * 1e9, "with_check": checked * 1e9},
    }


def report(results: dict[str, Any], when: dt.datetime) -> str:
    lines = [
        f"# tocsin bench cap, {when:%Y-%m-%d %H:%M} (commit {results['commit']})",
        "",
        "## 1. Ingest store per alert (local nats-server, awaited one at a time)",
        "",
        "| round | path | alerts | alerts/s | ms per alert |",
        "|---|---|---|---|---|",
    ]
    for row in results["store"]:
        rate = row["n"] / row["seconds"]
        per = row["seconds"] / row["n"] * 1e3
        path = "append_alert (no index)" if row["path"] == "append" else "store_alert (+ index)"
        lines.append(f"| {row['round']} | {path} | {row['n']} | {rate:.0f} | {per:.2f} |")
    ns = results["backlog_ns"]
    lines += [
        "",
        "## 2. CAP per document",
        "",
        "| step | ms |",
        "|---|---|",
        f"| in: parse + schema + mapping | {results['cap_in_ms']:.2f} |",
        f"| out: emit + schema check | {results['cap_out_ms']:.2f} |",
        "",
        "## 3. Backlog supersede check per alert (10,000 superseded ids held)",
        "",
        "| loop | ns |",
        "|---|---|",
        f"| header read only | {ns['without']:.0f} |",
        f"| header read + Supersessions look-up | {ns['with_check']:.0f} |",
    ]
    return "\n".join(lines) + "\n"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--alerts", type=int, default=1000, help="alerts per store round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    out_option(parser)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 1 <= args.alerts <= 100_000 or not 1 <= args.rounds <= 10:
        parser.error("--alerts must be 1-100,000 and --rounds 1-10")

    def stem(when: dt.datetime) -> str:
        return f"cap-{when:%Y-%m-%d-%H%M}"

    return run_and_write(run(args.alerts, args.rounds), report, args.out, stem)


if __name__ == "__main__":
    sys.exit(main())
