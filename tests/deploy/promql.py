"""What tocsin's metrics are, and a check of PromQL against them (``promql-parser``).

:data:`METRICS` is the list of names the gateway and the ingest service serve. The alert
rules and the dashboard may read only these (tests/deploy/test_dashboards.py): a metric
renamed in the code must be renamed here and where it is read, or the tests fail.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import promql_parser as pq

from tocsin.ingest.pipeline import Reason

GATEWAY_JOB = "tocsin-gateway"
INGEST_JOB = "tocsin-ingest"
BOTH = frozenset({GATEWAY_JOB, INGEST_JOB})
GATEWAY = frozenset({GATEWAY_JOB})
INGEST = frozenset({INGEST_JOB})
#: Labels Prometheus adds to every scraped series (prometheus.yml sets no honor_labels: a
#: series' own ``instance`` label is kept as ``exported_instance``).
TARGET_LABELS = frozenset({"job", "instance"})


@dataclass(frozen=True)
class Metric:
    kind: Literal["counter", "gauge", "histogram"]
    #: The scrape jobs whose targets serve it.
    jobs: frozenset[str]
    #: Label names as the process exposes them, and the values of those that are enums.
    labels: frozenset[str] = frozenset()
    values: Mapping[str, frozenset[str]] = field(default_factory=dict)


def _enum(*values: str) -> frozenset[str]:
    return frozenset(values)


#: What tocsin serves (docs/operations.md §8 and the observability work), by name.
METRICS: dict[str, Metric] = {
    # gateway
    "tocsin_gateway_connections": Metric("gauge", GATEWAY),
    "tocsin_gateway_sessions": Metric(
        "gauge",
        GATEWAY,
        _enum("mode", "ack_mode"),
        {"mode": _enum("catchup", "live"), "ack_mode": _enum("client", "auto")},
    ),
    "tocsin_gateway_inflight_alerts": Metric("gauge", GATEWAY),
    "tocsin_gateway_connections_opened_total": Metric("counter", GATEWAY),
    "tocsin_gateway_connections_closed_total": Metric("counter", GATEWAY, _enum("reason")),
    "tocsin_gateway_heartbeat_closes_total": Metric("counter", GATEWAY),
    "tocsin_gateway_alerts_sent_total": Metric("counter", GATEWAY),
    "tocsin_gateway_alerts_redelivered_total": Metric("counter", GATEWAY),
    "tocsin_gateway_acks_total": Metric("counter", GATEWAY),
    "tocsin_gateway_nats_connected": Metric("gauge", GATEWAY),
    "tocsin_gateway_background_tasks_running": Metric("gauge", GATEWAY),
    "tocsin_gateway_shutting_down": Metric("gauge", GATEWAY),
    "tocsin_gateway_churn_collections_total": Metric("counter", GATEWAY),
    "tocsin_gateway_queues_rebuilt_total": Metric("counter", GATEWAY),
    "tocsin_gateway_device_claims_total": Metric(
        "counter",
        GATEWAY,
        _enum("outcome"),
        {"outcome": _enum("taken_over", "superseded", "busy", "lost")},
    ),
    "tocsin_gateway_info": Metric("gauge", GATEWAY, _enum("instance")),
    "tocsin_delivery_latency_seconds": Metric(
        "histogram", GATEWAY, _enum("path"), {"path": _enum("live", "backlog")}
    ),
    "tocsin_gateway_handshake_seconds": Metric("histogram", GATEWAY),
    "tocsin_gateway_catchup_seconds": Metric("histogram", GATEWAY),
    "tocsin_gateway_healthy_connections": Metric("gauge", GATEWAY),
    "tocsin_gateway_rate_limit_warnings_total": Metric("counter", GATEWAY),
    "tocsin_gateway_bans_total": Metric("counter", GATEWAY),
    # gateway, read from JetStream (every gateway reports the same figures)
    "tocsin_offline_queued_messages": Metric("gauge", GATEWAY),
    "tocsin_offline_queued_devices": Metric("gauge", GATEWAY),
    "tocsin_dlq_messages": Metric("gauge", GATEWAY),
    "tocsin_stream_messages": Metric("gauge", GATEWAY, _enum("stream")),
    "tocsin_device_consumers": Metric("gauge", GATEWAY),
    # ingest
    "tocsin_ingest_alerts_accepted_total": Metric("counter", INGEST),
    "tocsin_ingest_alerts_rejected_total": Metric(
        "counter", INGEST, _enum("reason"), {"reason": frozenset(r.value for r in Reason)}
    ),
    "tocsin_ingest_duplicates_total": Metric("counter", INGEST),
    # prometheus_client's process collector, in both
    "process_cpu_seconds_total": Metric("counter", BOTH),
    "process_resident_memory_bytes": Metric("gauge", BOTH),
    "process_virtual_memory_bytes": Metric("gauge", BOTH),
    "process_start_time_seconds": Metric("gauge", BOTH),
    "process_open_fds": Metric("gauge", BOTH),
    "process_max_fds": Metric("gauge", BOTH),
}
#: Series Prometheus makes itself: ``up`` per target, ``ALERTS`` per pending or firing alert
#: (its labels are the alert's, so they are not checked).
SYNTHETIC: dict[str, frozenset[str] | None] = {"up": TARGET_LABELS, "ALERTS": None}
HISTOGRAM_SUFFIXES = {"_bucket": _enum("le"), "_sum": frozenset(), "_count": frozenset()}


def base_metric(name: str) -> str:
    """The metric a stored series name belongs to (``x_bucket`` -> ``x`` for histograms)."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in METRICS and METRICS[base].kind == "histogram":
            return base
    return name


def metric_labels(name: str) -> tuple[frozenset[str] | None, frozenset[str]]:
    """The labels a stored series of ``name`` has (None: any) and the jobs that serve it;
    KeyError for a name tocsin does not serve."""
    if name in SYNTHETIC:
        return SYNTHETIC[name], BOTH
    base = base_metric(name)
    metric = METRICS[base]
    if metric.kind == "histogram" and base == name:
        raise KeyError(f"{name} is a histogram: read {name}_bucket, _sum or _count")
    extra = HISTOGRAM_SUFFIXES[name.removeprefix(base)] if base != name else frozenset()
    own = {f"exported_{n}" if n in TARGET_LABELS else n for n in metric.labels}
    return frozenset(own) | TARGET_LABELS | extra, metric.jobs


def children(node: pq.Expr) -> list[pq.Expr]:
    if isinstance(node, pq.AggregateExpr):
        return [node.expr] + ([node.param] if isinstance(node.param, pq.Expr) else [])
    if isinstance(node, pq.BinaryExpr):
        return [node.lhs, node.rhs]
    if isinstance(node, pq.Call):
        return [a for a in node.args if isinstance(a, pq.Expr)]
    if isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return [node.expr]
    if isinstance(node, pq.MatrixSelector):
        return [node.vector_selector]
    return []


def walk(node: pq.Expr) -> Iterator[pq.Expr]:
    yield node
    for child in children(node):
        yield from walk(child)


def selectors(node: pq.Expr) -> Iterator[pq.VectorSelector]:
    return (n for n in walk(node) if isinstance(n, pq.VectorSelector))


def output_labels(node: pq.Expr) -> frozenset[str] | None:
    """The labels every series of ``node``'s result carries (None: not known), computed as
    PromQL does for the forms the rules and the dashboard use."""
    if isinstance(node, pq.VectorSelector):
        return metric_labels(node.name or "")[0]
    if isinstance(node, pq.MatrixSelector):
        return output_labels(node.vector_selector)
    if isinstance(node, pq.NumberLiteral | pq.StringLiteral):
        return frozenset()
    if isinstance(node, pq.ParenExpr | pq.UnaryExpr | pq.SubqueryExpr):
        return output_labels(node.expr)
    if isinstance(node, pq.AggregateExpr):
        modifier = node.modifier
        if modifier is None:
            return frozenset()
        if modifier.type == pq.AggModifierType.By:
            return frozenset(modifier.labels)
        inner = output_labels(node.expr)
        return None if inner is None else inner - set(modifier.labels)
    if isinstance(node, pq.Call):
        return _call_labels(node)
    if isinstance(node, pq.BinaryExpr):
        return _binary_labels(node)
    return None


def _call_labels(node: pq.Call) -> frozenset[str] | None:
    name = node.func.name
    args = [a for a in node.args if isinstance(a, pq.Expr)]
    if name in ("time", "vector", "scalar"):
        return frozenset()
    if name == "absent":
        (arg,) = args
        if isinstance(arg, pq.VectorSelector):
            equal = pq.MatchOp.Equal
            return frozenset(
                m.name for m in arg.matchers.matchers if m.op == equal and m.name != "__name__"
            )
        return frozenset()
    if name == "histogram_quantile":
        inner = output_labels(args[1])
        return None if inner is None else inner - {"le"}
    vectors = [a for a in args if not isinstance(a, pq.NumberLiteral | pq.StringLiteral)]
    return output_labels(vectors[0]) if vectors else frozenset()


def _binary_labels(node: pq.BinaryExpr) -> frozenset[str] | None:
    lhs, rhs = output_labels(node.lhs), output_labels(node.rhs)
    op = str(node.op).lower()
    if op in ("and", "unless"):
        return lhs
    if op == "or":
        return None if lhs is None or rhs is None else lhs & rhs
    if isinstance(node.lhs, pq.NumberLiteral):
        return rhs
    if isinstance(node.rhs, pq.NumberLiteral):
        return lhs
    matching = node.modifier.matching if node.modifier else None
    if matching is not None and matching.type == pq.LabelModifierType.Include:
        return frozenset(matching.labels)  # one-to-one `on (...)`: only those labels
    if lhs is None:
        return None
    return lhs - set(matching.labels) if matching is not None else lhs


#: Grafana's own variables, replaced by a value of their kind before parsing.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "__interval_ms": "60000",
    "__range_s": "3600",
}
VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


def substitute(expr: str, variables: set[str]) -> tuple[str, list[str]]:
    """``expr`` with Grafana variables replaced, and the names of undefined ones."""
    unknown: list[str] = []

    def one(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        if name in GRAFANA_BUILTINS:
            return GRAFANA_BUILTINS[name]
        if name not in variables:
            unknown.append(name)
        return ".+"  # the dashboard's variables stand inside regex matchers

    return VARIABLE.sub(one, expr), unknown


def problems(expr: str, jobs: Mapping[str, str]) -> list[str]:
    """What is wrong with ``expr``: it does not parse; it reads a metric tocsin does not
    serve, a label the metric lacks or a value an enum label never has; it names a job that
    is not in prometheus.yml or does not serve the metric; it groups or matches on labels
    its input lacks; a histogram_quantile has no ``le``. ``jobs``: prometheus.yml's job
    names, each mapped to itself if it is one of tocsin's, else to ""."""
    try:
        tree = pq.parse(expr)
    except ValueError as exc:
        return [f"does not parse: {exc}"]
    found: list[str] = []
    for selector in selectors(tree):
        found += _selector_problems(selector, jobs)
    if found:
        return found
    for node in walk(tree):
        if isinstance(node, pq.AggregateExpr) and node.modifier is not None:
            inner = output_labels(node.expr)
            missing = set(node.modifier.labels) - (inner or set(node.modifier.labels))
            if missing:
                found.append(f"{node}: grouping by labels its input lacks: {sorted(missing)}")
        if isinstance(node, pq.BinaryExpr) and node.modifier and node.modifier.matching:
            for side in (node.lhs, node.rhs):
                labels = output_labels(side)
                missing = set(node.modifier.matching.labels) - (labels or set())
                if labels is not None and missing:
                    found.append(f"{node}: matching on labels a side lacks: {sorted(missing)}")
        if isinstance(node, pq.Call) and node.func.name == "histogram_quantile":
            buckets = output_labels(node.args[1])
            if buckets is not None and "le" not in buckets:
                found.append(f"{node}: histogram_quantile over series without le")
    return found


def _selector_problems(selector: pq.VectorSelector, jobs: Mapping[str, str]) -> list[str]:
    name = selector.name
    if name is None:
        return [f"{selector}: select by metric name"]
    try:
        labels, serving = metric_labels(name)
    except KeyError as exc:
        return [f"{name}: not a metric tocsin serves ({exc.args[0]})"]
    metric = METRICS.get(base_metric(name))
    found = []
    for matcher in selector.matchers.matchers:
        if labels is not None and matcher.name not in labels:
            found.append(f"{name}: no label {matcher.name!r} (has {sorted(labels)})")
        if matcher.op != pq.MatchOp.Equal:
            continue
        if matcher.name == "job":
            if matcher.value not in jobs:
                found.append(f"{name}: job {matcher.value!r} is not in prometheus.yml")
            elif jobs[matcher.value] and jobs[matcher.value] not in serving:
                found.append(f"{name}: not served by job {matcher.value!r}")
        known = metric.values.get(matcher.name) if metric else None
        if known is not None and matcher.value not in known:
            found.append(f"{name}: {matcher.name}={matcher.value!r} not in {sorted(known)}")
    return found
