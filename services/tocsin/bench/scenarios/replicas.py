"""Replicas benchmark: what R1 and R3 device consumers cost on a 3-node cluster, and what
happens to each when a node dies (issue 5, part 3: ``TOCSIN_DEVICE_REPLICAS``).

Run::

    tocsin bench replicas [--consumers N] [--skip-loss] [--out DIR]

(or ``python -m tocsin.bench.scenarios.replicas``). Every phase runs on ``NatsCluster``
(3 nats-server processes on loopback, file storage) with tocsin's topology at R3
(``apply_topology``: ALERTS, INGEST, DLQ, all R3). Device consumers are built by
``DeviceQueues`` of ``tocsin.gateway.queue`` (``_config`` + ``_with_filters`` +
``coarse_filters``: ack_policy all, backoff, max_deliver, metadata, inactive_threshold,
filter ``alerts.KE.>``), with ``num_replicas`` 1 or 3. One fresh cluster per replica count:

1. **Creation.** N/2 consumers one at a time, then N/2 with 50 in flight
   (``js.add_consumer``), then 50 through the gateway's own ``DeviceQueues.open()``
   (consumer_info -> 404, stream_info, create).
2. **Footprint.** RSS of each node (``/proc``) before and after, consumers and HA assets
   per node (``/jsz``), Raft groups per node (``/raftz``), idle CPU of each node over 10 s.
3. **Delivery.** M alerts published (each PubAck awaited); K consumers each fetch them in
   batches of 50 and ack the last of each batch (AckAll, ``ack_sync``), 20 consumers at a
   time: deliveries/s and CPU of each node.
4. **Graceful stop.** SIGTERM to one node (not the meta leader, not the client's) with the
   N consumers: time to exit; then the restart until /healthz is 200.

Then, on a fourth cluster, **node loss**: 30 R1 and 6 R3 consumers, 20 alerts, 10 acked by
every consumer; ``kill -9`` of a node (not the meta leader, not the client's) that hosts R1
consumers. It records verbatim what consumer_info, fetch, ``DeviceQueues.open()``, delete
and create answer, how long R3 consumers take to elect a new leader and serve a fetch, the
recovery of a dead node's R1 queue from the R3 stream (same name after delete, and a new
name alongside), and, after the node returns, how long its R1 consumers take to answer
and whether their ack floor survived.

The client, the publisher and the three servers share the machine's cores (2 here), and
other processes may run meanwhile: absolute numbers carry that noise, compare R1 with R3
within one run. Every phase is bounded and reports an abort instead of hanging. Results:
stdout and ``benchmarks/results/replicas-<date>[-nN].md`` (under the current directory, or
``--out``) with a JSON twin.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from nats.js.errors import APIError

from tocsin.bench.procs import usage
from tocsin.core.coarse import coarse_filters
from tocsin.core.embedded import NatsCluster, NatsServer
from tocsin.core.naming import SUBSCRIPTION_KEY, Names
from tocsin.core.settings import isolated_settings
from tocsin.core.topology import apply_topology
from tocsin.gateway.queue import DeviceQueues
from tocsin.schemas.subscription import Subscription

from .common import (
    code_version,
    fmt,
    nats_log_summary,
    out_option,
    percentile,
    progress,
    run_and_write,
    server_version,
)

NAMESPACE = "rb"
REGIONS = ("KE",)
CLIENT_ID = "phone"
READER_CONCURRENCY = 20
BATCH = 50
PHASE_LIMIT = 240.0
STOP_LIMIT = 180.0
# node loss
LOSS_R1 = 30
LOSS_R3 = 6
LOSS_ALERTS = 20
LOSS_ACKED = 10
LOSS_EXTRA = 5  # published while the node is down
WATCH_SECONDS = 8.0


@dataclass(frozen=True)
class Sizes:
    """What one replica count's run repeats besides N; the command line always uses these
    defaults (the tests shrink them)."""

    concurrency: int = 50  # creations in flight
    open_sample: int = 50  # creations through DeviceQueues.open()
    idle_seconds: float = 10.0
    alerts: int = 100  # M: published per replica count, pending on every consumer
    readers: int = 100  # K: consumers that fetch and ack all M (at most N)
    start_seconds: float = 2.0  # after the cluster is up, before the first view
    settle_seconds: float = 3.0  # after the creations: replication and the Go GC settle


# ---------------------------------------------------------------- helpers


def describe(exc: BaseException) -> str:
    """An exception as seen by the client, verbatim: class, status code, JetStream code."""
    if isinstance(exc, APIError):
        return (
            f"{type(exc).__name__}(code={exc.code}, err_code={exc.err_code}, "
            f"description={exc.description!r})"
        )
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


def http_json(node: NatsServer, path: str, timeout: float = 5) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"http://{node.host}:{node.monitor_port}{path}"
    with opener.open(url, timeout=timeout) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def node_view(node: NatsServer) -> dict[str, Any]:
    """What a node says about itself: JetStream counts, Raft groups, RSS and CPU."""
    out: dict[str, Any] = {"name": node.name}
    pid = node.process.pid if node.process else 0
    u = usage(pid)
    out["rss_mb"] = u.rss_bytes / 2**20
    out["cpu_s"] = u.cpu_seconds
    try:
        jsz = http_json(node, "/jsz")
        out["consumers"] = jsz.get("consumers", 0)
        out["ha_assets"] = jsz.get("ha_assets", 0)
        out["meta_leader"] = (jsz.get("meta_cluster") or {}).get("leader")
        # /raftz alone lists the system account's groups (the meta group); streams and
        # consumers of the default account are under ?acc=$G. R1 assets have no group.
        raftz = {**http_json(node, "/raftz"), **http_json(node, "/raftz?acc=%24G")}
        groups = [g for acc in raftz.values() for g in acc]
        out["raft_groups"] = len(groups)
        out["raft_consumer_groups"] = sum(1 for g in groups if g.startswith("C-"))
    except (OSError, ValueError) as exc:
        out["error"] = describe(exc)
    return out


def views(cluster: NatsCluster) -> list[dict[str, Any]]:
    return [node_view(n) for n in cluster.nodes]


def cpu_of(cluster: NatsCluster) -> list[float]:
    return [usage(n.process.pid).cpu_seconds if n.process else 0.0 for n in cluster.nodes]


def user_of(i: int) -> str:
    return f"user{i:05d}"


class Fleet:
    """One cluster with tocsin's topology at R3 and a client on node 1."""

    def __init__(self, root: Path, label: str, device_replicas: int, max_devices: int) -> None:
        self.dir = root / label
        self.cluster = NatsCluster(self.dir, size=3, name=f"rb{label}")
        self.settings = isolated_settings(
            namespace=NAMESPACE,
            replicas=3,
            device_replicas=device_replicas,
            max_devices=max_devices,
        )
        self.names = Names(NAMESPACE)
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.queues: DeviceQueues | None = None

    @property
    def stream(self) -> str:
        return self.names.alerts_stream

    async def start(self) -> Fleet:
        await asyncio.to_thread(self.cluster.start, 60)
        # The client talks to node 1 only: nodes 2 and 3 are the ones stopped and killed.
        self.nc = await nats.connect(self.cluster.nodes[0].url, max_reconnect_attempts=-1)
        self.js = self.nc.jetstream(timeout=10)
        await apply_topology(self.js, self.settings, self.names)
        self.queues = DeviceQueues(self.nc, self.js, self.settings, self.names)
        return self

    def config(self, user: str, start_seq: int, name: str | None = None) -> ConsumerConfig:
        """The device consumer exactly as DeviceQueues.open() creates it."""
        assert self.queues is not None
        subscription = Subscription()
        name = name or self.names.device_consumer(user, CLIENT_ID)
        cfg = self.queues._config(
            name, user, CLIENT_ID, start_seq, {SUBSCRIPTION_KEY: subscription.to_json()}
        )
        return self.queues._with_filters(cfg, coarse_filters(self.names, subscription, REGIONS))

    async def last_seq(self) -> int:
        assert self.js is not None
        return (await self.js.stream_info(self.stream)).state.last_seq

    async def publish(self, count: int) -> list[float]:
        assert self.js is not None
        subject = self.names.alert_subject("KE-30", "high", "flood")
        took = []
        for i in range(count):
            t = time.perf_counter()
            await self.js.publish(subject, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 180))
            took.append(time.perf_counter() - t)
        return took

    def meta_leader(self) -> str | None:
        for node in self.cluster.nodes:
            if node.running:
                with contextlib.suppress(OSError, ValueError):
                    return (http_json(node, "/jsz").get("meta_cluster") or {}).get("leader")
        return None

    def spare_node(self, prefer: Callable[[int], bool] = lambda i: True) -> int:
        """A node to stop or kill: not node 1 (the client's), not the meta leader if
        possible, and ``prefer`` if possible."""
        leader = self.meta_leader()
        names = [n.name for n in self.cluster.nodes]
        order = sorted(
            (1, 2), key=lambda i: (names[i] == leader, not prefer(i), -i)
        )  # -i: node 3 first when all else is equal
        return order[0]

    async def close(self) -> dict[str, Any]:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        logs = {
            n.name: nats_log_summary(self.dir / f"n{i + 1}.log")
            for i, n in enumerate(self.cluster.nodes)
        }
        for node in self.cluster.nodes:
            node.kill()  # the store is thrown away: no need for a graceful stop
        return logs


async def bounded(what: str, limit: float, coro: Awaitable[Any], aborted: list[str]) -> Any:
    try:
        async with asyncio.timeout(limit):
            return await coro
    except TimeoutError:
        aborted.append(f"{what}: over {limit:.0f} s")
        progress(f"ABORTED {what}: over {limit:.0f} s")
        return None


# ---------------------------------------------------------------- cost per replica count


async def create_many(fleet: Fleet, first: int, count: int, concurrency: int) -> list[float]:
    js = fleet.js
    assert js is not None
    start = await fleet.last_seq() + 1
    gate = asyncio.Semaphore(concurrency)
    took: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            t = time.perf_counter()
            await js.add_consumer(fleet.stream, fleet.config(user_of(i), start))
            took.append(time.perf_counter() - t)

    await asyncio.gather(*(one(i) for i in range(first, first + count)))
    return took


def creation_summary(took: list[float], wall: float) -> dict[str, Any]:
    ms = [x * 1000 for x in took]
    return {
        "n": len(ms),
        "wall_s": wall,
        "per_s": len(ms) / wall if wall else float("nan"),
        "wall_ms_per_consumer": wall * 1000 / len(ms) if ms else float("nan"),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms, default=float("nan")),
    }


async def deliver(fleet: Fleet, consumers: list[str], count: int) -> dict[str, Any]:
    """Every consumer in ``consumers`` fetches its ``count`` pending alerts and acks them."""
    assert fleet.js is not None
    gate = asyncio.Semaphore(READER_CONCURRENCY)
    got: list[int] = []
    fetch_ms: list[float] = []

    async def one(name: str) -> None:
        assert fleet.js is not None and fleet.queues is not None
        async with gate:
            sub = await fleet.queues.reader(name)
            n = 0
            try:
                while n < count:
                    t = time.perf_counter()
                    msgs = await sub.fetch(min(BATCH, count - n), timeout=10)
                    fetch_ms.append((time.perf_counter() - t) * 1000)
                    n += len(msgs)
                    await msgs[-1].ack_sync(timeout=10)
            finally:
                await sub.unsubscribe()
            got.append(n)

    cpu0, t0 = cpu_of(fleet.cluster), time.perf_counter()
    await asyncio.gather(*(one(c) for c in consumers))
    wall = time.perf_counter() - t0
    cpu = [b - a for a, b in zip(cpu0, cpu_of(fleet.cluster), strict=True)]
    info = await fleet.js.consumer_info(fleet.stream, consumers[0])
    last = await fleet.last_seq()
    total = sum(got)
    return {
        "consumers": len(consumers),
        "alerts_each": count,
        "deliveries": total,
        "wall_s": wall,
        "deliveries_per_s": total / wall,
        "fetch_p50_ms": percentile(fetch_ms, 50),
        "fetch_p99_ms": percentile(fetch_ms, 99),
        "node_cpu_s": cpu,
        "cluster_cpu_ms_per_delivery": sum(cpu) * 1000 / total if total else float("nan"),
        "ack_floor_ok": info.ack_floor.stream_seq == last if info.ack_floor else False,
    }


async def measure(
    root: Path, replicas: int, n: int, aborted: list[str], sizes: Sizes = Sizes()
) -> dict[str, Any]:
    z = sizes
    label = f"r{replicas}"
    progress(f"--- R{replicas}: starting a 3-node cluster")
    fleet = await Fleet(root, label, replicas, max_devices=n + z.open_sample + 100).start()
    out: dict[str, Any] = {"replicas": replicas, "consumers": n}
    try:
        await asyncio.sleep(z.start_seconds)
        out["before"] = views(fleet.cluster)
        half = n // 2
        progress(f"R{replicas}: creating {half} consumers one at a time")
        t = time.perf_counter()
        took = await bounded(
            f"R{replicas} sequential creation", PHASE_LIMIT, create_many(fleet, 0, half, 1), aborted
        )
        out["create_sequential"] = creation_summary(took or [], time.perf_counter() - t)
        progress(f"R{replicas}: creating {n - half} consumers, {z.concurrency} in flight")
        t = time.perf_counter()
        took = await bounded(
            f"R{replicas} concurrent creation",
            PHASE_LIMIT,
            create_many(fleet, half, n - half, z.concurrency),
            aborted,
        )
        out["create_concurrent"] = creation_summary(took or [], time.perf_counter() - t)
        progress(f"R{replicas}: {z.open_sample} more through DeviceQueues.open()")
        assert fleet.queues is not None
        opened: list[float] = []
        t = time.perf_counter()
        for i in range(n, n + z.open_sample):
            t1 = time.perf_counter()
            await fleet.queues.open(user_of(i), CLIENT_ID, REGIONS)
            opened.append(time.perf_counter() - t1)
        out["create_open"] = creation_summary(opened, time.perf_counter() - t)
        total = n + z.open_sample
        out["total_consumers"] = total
        await asyncio.sleep(z.settle_seconds)  # let replication and the Go GC settle
        out["after"] = views(fleet.cluster)
        out["rss_kb_per_consumer"] = [
            (a["rss_mb"] - b["rss_mb"]) * 1024 / total
            for a, b in zip(out["after"], out["before"], strict=True)
        ]
        out["rss_kb_per_hosted_consumer"] = [
            (a["rss_mb"] - b["rss_mb"]) * 1024 / max(1, a["consumers"] - b["consumers"])
            for a, b in zip(out["after"], out["before"], strict=True)
        ]
        progress(f"R{replicas}: idle CPU over {z.idle_seconds:.0f} s")
        cpu0 = cpu_of(fleet.cluster)
        await asyncio.sleep(z.idle_seconds)
        out["idle_cpu_pct"] = [
            (b - a) * 100 / z.idle_seconds for a, b in zip(cpu0, cpu_of(fleet.cluster), strict=True)
        ]

        progress(f"R{replicas}: publishing {z.alerts} alerts, {z.readers} consumers fetch + ack")
        pub = await fleet.publish(z.alerts)
        out["publish_ms_p50"] = percentile([x * 1000 for x in pub], 50)
        out["publish_ms_p99"] = percentile([x * 1000 for x in pub], 99)
        readers = [
            fleet.names.device_consumer(user_of(i), CLIENT_ID) for i in range(min(z.readers, n))
        ]
        out["delivery"] = await bounded(
            f"R{replicas} delivery", PHASE_LIMIT, deliver(fleet, readers, z.alerts), aborted
        )

        victim = fleet.spare_node()
        node = fleet.cluster.nodes[victim]
        progress(f"R{replicas}: SIGTERM to {node.name} with its consumers")
        hosted = node_view(node).get("consumers")
        assert node.process is not None
        t = time.perf_counter()
        node.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(node.process.wait, STOP_LIMIT)
            stop_s: float | None = time.perf_counter() - t
        except Exception:
            aborted.append(f"R{replicas} graceful stop: over {STOP_LIMIT:.0f} s, killed")
            node.kill()
            stop_s = None
        t = time.perf_counter()
        await asyncio.to_thread(fleet.cluster.start_node, victim, 60)
        up_s = time.perf_counter() - t
        await asyncio.to_thread(fleet.cluster.wait_healthy, 120)
        out["graceful_stop"] = {
            "node": node.name,
            "consumers_on_node": hosted,
            "sigterm_to_exit_s": stop_s,
            "ms_per_consumer": stop_s * 1000 / hosted if stop_s and hosted else None,
            "restart_to_port_s": up_s,
            "restart_to_healthy_s": time.perf_counter() - t + up_s,
        }
    finally:
        out["nats_log"] = await fleet.close()
    return out


# ---------------------------------------------------------------- node loss


class Log:
    """Timestamped observations, relative to the kill."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.events: list[dict[str, Any]] = []

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, what: str, outcome: str, **extra: Any) -> None:
        event = {"t_s": round(self.now(), 3), "what": what, "outcome": outcome, **extra}
        self.events.append(event)
        progress(f"  t={event['t_s']:7.3f}s {what}: {outcome}")


async def attempt(coro: Awaitable[Any], limit: float) -> tuple[Any, str, float]:
    """Run ``coro`` with a bound: (result or None, 'ok' or the error verbatim, seconds)."""
    t = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            result = await coro
        return result, "ok", time.perf_counter() - t
    except Exception as exc:
        return None, describe(exc), time.perf_counter() - t


async def fetch_seqs(
    fleet: Fleet, name: str, limit: float, ack: bool = False, most: int = 10_000
) -> list[int]:
    """Fetch what is pending (until a fetch comes back empty, or ``most``); stream seqs."""
    assert fleet.queues is not None
    sub = await fleet.queues.reader(name)
    seqs: list[int] = []
    try:
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline and len(seqs) < most:
            try:
                msgs = await sub.fetch(min(BATCH, most - len(seqs)), timeout=1.5)
            except nats.errors.TimeoutError:
                break
            seqs += [m.metadata.sequence.stream for m in msgs]
            if ack:
                await msgs[-1].ack_sync(timeout=5)
    finally:
        await sub.unsubscribe()
    return seqs


async def watch(
    log: Log, what: str, probe: Callable[[], Awaitable[str]], seconds: float, until_ok: bool
) -> float | None:
    """Call ``probe`` repeatedly for ``seconds``; log each change of outcome. The time of the
    first 'ok' outcome (since the kill), or None."""
    last, first_ok = None, None
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        outcome = await probe()
        if outcome != last:
            log.add(what, outcome)
            last = outcome
        if outcome.startswith("ok") and first_ok is None:
            first_ok = log.now()
            if until_ok:
                break
        await asyncio.sleep(0.1)
    return first_ok


async def node_loss(root: Path, aborted: list[str]) -> dict[str, Any]:
    progress("--- node loss: starting a 3-node cluster")
    fleet = await Fleet(root, "loss", 1, max_devices=500).start()
    out: dict[str, Any] = {
        "r1_consumers": LOSS_R1,
        "r3_consumers": LOSS_R3,
        "alerts": LOSS_ALERTS,
        "acked": LOSS_ACKED,
    }
    js, queues, stream = fleet.js, fleet.queues, fleet.stream
    assert js is not None and queues is not None
    try:
        await asyncio.sleep(1)
        users = {1: [f"r1u{i:02d}" for i in range(LOSS_R1)], 3: [f"r3u{i}" for i in range(LOSS_R3)]}
        for replicas, group in users.items():
            for user in group:
                cfg = fleet.config(user, 1)
                cfg.num_replicas = replicas
                await js.add_consumer(stream, cfg)
        await fleet.publish(LOSS_ALERTS)
        placement: dict[str, str] = {}
        for group in users.values():
            for user in group:
                name = fleet.names.device_consumer(user, CLIENT_ID)
                seqs = await fetch_seqs(fleet, name, 10, ack=True, most=LOSS_ACKED)
                assert seqs == list(range(1, LOSS_ACKED + 1)), (name, seqs)
                info = await js.consumer_info(stream, name)
                assert info.ack_floor is not None and info.ack_floor.stream_seq == LOSS_ACKED
                placement[name] = (info.cluster.leader if info.cluster else None) or "?"
        r1 = [fleet.names.device_consumer(u, CLIENT_ID) for u in users[1]]
        r3 = [fleet.names.device_consumer(u, CLIENT_ID) for u in users[3]]
        node_names = [n.name for n in fleet.cluster.nodes]
        out["r1_per_node"] = {x: sum(placement[c] == x for c in r1) for x in node_names}
        out["r3_leaders_per_node"] = {x: sum(placement[c] == x for c in r3) for x in node_names}
        victim = fleet.spare_node(
            lambda i: (
                any(placement[c] == node_names[i] for c in r3)
                and any(placement[c] == node_names[i] for c in r1)
            )
        )
        dead = node_names[victim]
        stream_info = await js.stream_info(stream)
        out["victim"] = dead
        out["meta_leader_before"] = fleet.meta_leader()
        out["stream_leader_before"] = stream_info.cluster.leader if stream_info.cluster else None
        on_dead = [c for c in r1 if placement[c] == dead]
        r3_led = [c for c in r3 if placement[c] == dead]
        r3_other = [c for c in r3 if placement[c] != dead]
        out["r1_on_victim"] = len(on_dead)
        out["r3_led_by_victim"] = len(r3_led)
        if len(on_dead) < 3:
            aborted.append(f"node loss: only {len(on_dead)} R1 consumers on {dead} (need 3)")
            return out
        watched, deleted, renamed = on_dead[0], on_dead[1], on_dead[2]
        progress(f"node loss: kill -9 {dead} ({len(on_dead)} R1 consumers, leads {len(r3_led)} R3)")

        log = Log()
        fleet.cluster.kill(victim)
        log.add(f"kill -9 {dead}", "done")

        async def info_probe(name: str) -> str:
            info, outcome, took = await attempt(js.consumer_info(stream, name, timeout=1), 2)
            if info is None:
                return f"{outcome} (after {took:.2f} s)"
            leader = info.cluster.leader if info.cluster else None
            return f"ok leader={leader} ack_floor={info.ack_floor.stream_seq}"

        async def r3_probe(name: str) -> str:
            info, outcome, _ = await attempt(js.consumer_info(stream, name, timeout=2), 3)
            if info is None:
                return outcome
            leader = info.cluster.leader if info.cluster else None
            return f"ok leader={leader}" if leader and leader != dead else f"leader={leader}"

        # --- R3 consumers: re-election (the ones the dead node led) and fetch
        elected = await asyncio.gather(
            *(
                watch(log, f"R3 {c} consumer_info", functools.partial(r3_probe, c), 30, True)
                for c in r3_led
            )
        )
        out["r3_reelection_s"] = [x for x in elected if x is not None]
        out["r3_not_reelected"] = sum(x is None for x in elected)

        async def fetch_probe(name: str) -> str:
            sub = await queues.reader(name)
            try:
                msgs, outcome, took = await attempt(sub.fetch(1, timeout=2), 3)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
            if msgs is None:
                return f"{outcome} (after {took:.2f} s)"
            return f"ok seq={msgs[0].metadata.sequence.stream} in {took * 1000:.0f} ms"

        fetched = []
        for c in r3_led + r3_other[:1]:
            fetched.append(
                await watch(log, f"R3 {c} fetch(1)", functools.partial(fetch_probe, c), 15, True)
            )
        out["r3_first_fetch_s"] = fetched

        # --- R1 on the dead node: consumer_info, fetch, DeviceQueues.open()
        await watch(
            log,
            f"R1 {watched} (dead node) consumer_info",
            lambda: info_probe(watched),
            WATCH_SECONDS,
            False,
        )
        log.add(f"R1 {watched} (dead node) fetch(1)", await fetch_probe(watched))
        user = users[1][r1.index(watched)]
        _, outcome, took = await attempt(queues.open(user, CLIENT_ID, REGIONS), 15)
        log.add(f"R1 {watched} (dead node) DeviceQueues.open()", f"{outcome} (after {took:.2f} s)")
        alive_r1 = next(c for c in r1 if placement[c] != dead)
        log.add(f"R1 {alive_r1} (live node) fetch(1)", await fetch_probe(alive_r1))

        # --- the R3 stream keeps taking alerts
        _, outcome, took = await attempt(fleet.publish(LOSS_EXTRA), 30)
        log.add(f"publish {LOSS_EXTRA} alerts to the R3 stream", f"{outcome} ({took:.2f} s)")
        last = await fleet.last_seq()
        expected = list(range(LOSS_ACKED + 1, last + 1))
        out["expected_after_recovery"] = [expected[0], expected[-1], len(expected)]

        # --- recovery from the R3 stream, while the node is down
        recovery: dict[str, Any] = {"known_floor": LOSS_ACKED, "expected": len(expected)}
        t_start = log.now()
        ok, outcome, took = await attempt(js.delete_consumer(stream, deleted), 15)
        log.add(f"recovery A: delete {deleted}", f"{outcome} ({took:.3f} s)")
        recovery["delete"] = {"outcome": outcome, "s": took, "result": ok}
        after_delete = await info_probe(deleted)
        log.add(f"recovery A: consumer_info {deleted} after the delete", after_delete)
        recovery["delete"]["info_after"] = after_delete

        async def recreate(label: str, user: str, name: str, what: str) -> dict[str, Any]:
            """Create ``name`` at the known floor + 1 on a live node; what it then yields."""
            config = fleet.config(user, LOSS_ACKED + 1, name=name)
            info, outcome, took = await attempt(js.add_consumer(stream, config), 15)
            leader = info.cluster.leader if info is not None and info.cluster else None
            log.add(f"recovery {label}: {what}", f"{outcome} ({took:.3f} s) leader={leader}")
            seqs = await fetch_seqs(fleet, name, 15, ack=True) if info is not None else []
            exact = seqs == expected
            log.add(f"recovery {label}: {name} yields", f"{len(seqs)} alerts, exact={exact}")
            return {
                "create": outcome,
                "create_s": took,
                "placed_on": leader,
                "yields": [seqs[0], seqs[-1], len(seqs)] if seqs else [],
                "exactly_unacked": exact,
            }

        user_a = users[1][r1.index(deleted)]
        recovery["same_name"] = await recreate(
            "A", user_a, deleted, f"create {deleted} again, opt_start_seq={LOSS_ACKED + 1}"
        )
        user_b = users[1][r1.index(renamed)]
        new_name = f"{renamed}__r"
        recovery["new_name"] = await recreate(
            "B", user_b, new_name, f"create {new_name} (old {renamed} left alone)"
        )
        # C: the same name again without deleting: an update of a consumer nobody serves
        if len(on_dead) > 3:
            same = on_dead[3]
            user_c = users[1][r1.index(same)]
            info, outcome, took = await attempt(
                js.add_consumer(stream, fleet.config(user_c, LOSS_ACKED + 1)), 15
            )
            leader = info.cluster.leader if info is not None and info.cluster else None
            log.add(
                f"recovery C: create {same} again without delete",
                f"{outcome} ({took:.3f} s) leader={leader}",
            )
            recovery["same_name_no_delete"] = {"create": outcome, "s": took, "placed_on": leader}
        recovery["total_s"] = log.now() - t_start
        out["recovery"] = recovery

        # --- the node returns
        t_down = log.now()
        await asyncio.to_thread(fleet.cluster.start_node, victim, 60)
        log.add(f"restart {dead}", "port open")
        returned = log.now()
        back = await watch(
            log, f"R1 {watched} consumer_info after restart", lambda: info_probe(watched), 60, True
        )
        out["down_s"] = t_down
        out["r1_usable_after_restart_s"] = back - returned if back is not None else None
        info, outcome, _ = await attempt(js.consumer_info(stream, watched, timeout=2), 3)
        out["r1_ack_floor_after_restart"] = info.ack_floor.stream_seq if info else outcome
        seqs = await fetch_seqs(fleet, watched, 15, ack=True)
        out["r1_yields_after_restart"] = [seqs[0], seqs[-1], len(seqs)] if seqs else []
        out["r1_exactly_unacked_after_restart"] = seqs == expected
        log.add(
            f"R1 {watched} after restart yields", f"{len(seqs)} alerts, exact={seqs == expected}"
        )
        healthy_t = log.now()
        await asyncio.to_thread(fleet.cluster.wait_healthy, 120)
        out["restart_to_healthy_s"] = log.now() - returned
        log.add(f"{dead} /healthz", f"200 ({log.now() - healthy_t:.2f} s after the check began)")
        # the deleted-and-recreated one: does the old copy come back?
        await asyncio.sleep(2)
        log.add(f"recovery A: {deleted} after the node returned", await info_probe(deleted))
        log.add(f"recovery B: old {renamed} after the node returned", await info_probe(renamed))
        dead_view = node_view(fleet.cluster.nodes[victim])
        out["victim_view_after"] = dead_view
        for c in r3_led:
            log.add(f"R3 {c} after the node returned", await info_probe(c))
        out["events"] = log.events
    finally:
        out["nats_log"] = await fleet.close()
    return out


# ---------------------------------------------------------------- report


def per_node(values: list[Any] | None, digits: int = 1) -> str:
    if not values:
        return "n/a"
    return " / ".join(fmt(float(v), digits) if v is not None else "n/a" for v in values)


def report(results: dict[str, Any], when: dt.datetime) -> str:
    c = results["config"]
    z = Sizes(**c["sizes"]) if "sizes" in c else Sizes()
    out = [
        f"# tocsin replicas benchmark (device consumers R1 vs R3), {when:%Y-%m-%d %H:%M}",
        "",
        f"{c['server']}; nats-py {c['nats_py']}; Python {c['python']}; {c['cores']} cores; "
        f"commit {c['commit']}. 3 nodes on loopback (file storage), topology at R3; "
        f"N = {c['consumers']} device consumers (+{z.open_sample} via DeviceQueues.open()), "
        f"one fresh cluster per replica count; M = {z.alerts} alerts, K = {z.readers} readers. "
        "The client and the 3 servers share the cores with other processes (other test suites "
        "may run meanwhile): compare R1 with R3 within this run. Node figures are n1 / n2 / n3.",
        "",
        "## Cost",
        "",
        "| measure | R1 | R3 | R3 / R1 |",
        "|---|---:|---:|---:|",
    ]
    by = {r["replicas"]: r for r in results["runs"]}
    r1, r3 = by.get(1, {}), by.get(3, {})

    def get(r: dict[str, Any], *path: str) -> Any:
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None  # type: ignore[assignment]
        return r

    def row(label: str, *path: str, digits: int = 1) -> None:
        a, b = get(r1, *path), get(r3, *path)
        ratio = fmt(b / a, 2) + "x" if isinstance(a, float | int) and a and b else ""
        out.append(f"| {label} | {fmt(a, digits)} | {fmt(b, digits)} | {ratio} |")

    def node_row(label: str, key: str, digits: int = 1) -> None:
        out.append(
            f"| {label} | {per_node(r1.get(key), digits)} | {per_node(r3.get(key), digits)} | |"
        )

    row(
        "create, sequential: ms per consumer (wall)",
        "create_sequential",
        "wall_ms_per_consumer",
        digits=2,
    )
    row("create, sequential: p99 ms", "create_sequential", "p99_ms", digits=2)
    row(f"create, {z.concurrency} in flight: consumers/s", "create_concurrent", "per_s")
    row(f"create, {z.concurrency} in flight: p99 ms", "create_concurrent", "p99_ms")
    row(
        "DeviceQueues.open() (new device): ms each", "create_open", "wall_ms_per_consumer", digits=2
    )
    for r in (r1, r3):
        if r.get("after"):
            r["consumers_per_node"] = [v["consumers"] for v in r["after"]]
            r["raft_groups_per_node"] = [v["raft_groups"] for v in r["after"]]
            r["raft_groups_before"] = [v["raft_groups"] for v in r["before"]]
            r["ha_assets_per_node"] = [v["ha_assets"] for v in r["after"]]
            r["rss_before"] = [v["rss_mb"] for v in r["before"]]
            r["rss_after"] = [v["rss_mb"] for v in r["after"]]
            r["idle_cpu_sum"] = sum(r["idle_cpu_pct"])
            r["rss_sum_kb_per_consumer"] = sum(r["rss_kb_per_consumer"])
    node_row("consumers hosted per node (/jsz)", "consumers_per_node", 0)
    node_row("Raft groups per node before (/raftz)", "raft_groups_before", 0)
    node_row("Raft groups per node after (/raftz)", "raft_groups_per_node", 0)
    node_row("HA assets per node (/jsz ha_assets)", "ha_assets_per_node", 0)
    node_row("RSS MB per node before", "rss_before")
    node_row("RSS MB per node after", "rss_after")
    node_row("RSS KB per consumer created, per node", "rss_kb_per_consumer")
    node_row("RSS KB per consumer hosted, per node", "rss_kb_per_hosted_consumer")
    row("RSS KB per consumer, whole cluster", "rss_sum_kb_per_consumer")
    node_row(f"idle CPU % per node ({z.idle_seconds:.0f} s)", "idle_cpu_pct", 2)
    row("idle CPU %, whole cluster", "idle_cpu_sum", digits=2)
    row("publish p50 ms (R3 stream)", "publish_ms_p50", digits=2)
    row("delivery: deliveries/s (fetch 50 + ack_sync)", "delivery", "deliveries_per_s", digits=0)
    row("delivery: fetch p99 ms", "delivery", "fetch_p99_ms")
    row(
        "delivery: cluster CPU ms per delivery", "delivery", "cluster_cpu_ms_per_delivery", digits=3
    )
    for r in (r1, r3):
        if r.get("delivery"):
            r["delivery_cpu"] = r["delivery"]["node_cpu_s"]
    node_row("delivery: CPU s per node", "delivery_cpu", 2)
    row("graceful stop: consumers on the node", "graceful_stop", "consumers_on_node", digits=0)
    row("graceful stop: SIGTERM to exit, s", "graceful_stop", "sigterm_to_exit_s", digits=2)
    row("graceful stop: ms per consumer", "graceful_stop", "ms_per_consumer", digits=2)
    row("restart to /healthz 200, s", "graceful_stop", "restart_to_healthy_s", digits=2)
    loss = results.get("node_loss") or {}
    if loss:
        out += [
            "",
            "## Node loss",
            "",
            f"{loss['r1_consumers']} R1 and {loss['r3_consumers']} R3 device consumers; "
            f"{loss['alerts']} alerts, the first {loss['acked']} acked by every consumer. "
            f"R1 per node: {loss.get('r1_per_node')}; R3 leaders per node: "
            f"{loss.get('r3_leaders_per_node')}. Killed (-9): **{loss.get('victim')}** "
            f"(meta leader {loss.get('meta_leader_before')}, stream leader "
            f"{loss.get('stream_leader_before')}); it hosted {loss.get('r1_on_victim')} R1 "
            f"consumers and led {loss.get('r3_led_by_victim')} R3 ones. "
            f"{LOSS_EXTRA} alerts were published while it was down.",
            "",
            f"- R3 leader re-election after the kill: {per_node(loss.get('r3_reelection_s'), 2)} s"
            f" (not re-elected: {loss.get('r3_not_reelected')}); first successful fetch (probed "
            "after the re-election watch, one consumer after another, the last one led by a "
            f"live node): "
            f"{per_node(loss.get('r3_first_fetch_s'), 2)} s",
            "- R1 consumer of the dead node usable again "
            f"{fmt(loss.get('r1_usable_after_restart_s'), 2)} s "
            f"after its node's port opened (down {fmt(loss.get('down_s'), 1)} s); ack floor "
            f"after restart: {loss.get('r1_ack_floor_after_restart')} (was {loss['acked']}); "
            f"then yields {loss.get('r1_yields_after_restart')} [first, last, count], exactly "
            f"the unacked: {loss.get('r1_exactly_unacked_after_restart')}; restart to /healthz: "
            f"{fmt(loss.get('restart_to_healthy_s'), 2)} s",
        ]
        rec = loss.get("recovery") or {}
        if rec:
            out += [
                f"- Recovery while down, same name (delete, create with opt_start_seq = floor + 1)"
                f": delete {rec['delete']['outcome']} in {fmt(rec['delete']['s'], 3)} s; create "
                f"{rec['same_name']['create']} in {fmt(rec['same_name']['create_s'], 3)} s on "
                f"{rec['same_name']['placed_on']}; yields {rec['same_name']['yields']}, exactly "
                f"the unacked: {rec['same_name']['exactly_unacked']}",
                f"- consumer_info right after that delete: `{rec['delete'].get('info_after')}`",
                f"- Recovery while down, new name: create {rec['new_name']['create']} in "
                f"{fmt(rec['new_name']['create_s'], 3)} s on {rec['new_name']['placed_on']}; "
                f"yields {rec['new_name']['yields']}, exactly the unacked: "
                f"{rec['new_name']['exactly_unacked']}",
            ]
            if rec.get("same_name_no_delete"):
                nd = rec["same_name_no_delete"]
                out.append(
                    f"- Same name again without delete while down: `{nd['create']}` in "
                    f"{fmt(nd['s'], 3)} s (placed on {nd['placed_on']})"
                )
        out += [
            "",
            "### Timeline (t since the kill; outcomes verbatim)",
            "",
            "| t s | what | outcome |",
            "|---:|---|---|",
        ]
        out += [
            f"| {e['t_s']:.3f} | {e['what']} | `{e['outcome']}` |" for e in loss.get("events", [])
        ]
    notes = [f"ABORTED {x}" for x in results["aborted"]]
    for label, logs in results.get("nats_logs", {}).items():
        for node, counts in logs.items():
            for msg, n in list(counts.items())[:8]:
                notes.append(f"{label} {node}: {n} x {msg}")
    out += ["", "## Anomalies and server warnings", ""]
    out += [f"- {n}" for n in notes] or ["- none"]
    return "\n".join(out) + "\n"


async def run(consumers: int, skip_loss: bool = False, sizes: Sizes = Sizes()) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="tocsin-replicas-"))
    results: dict[str, Any] = {
        "config": {
            "server": server_version(),
            "nats_py": importlib.metadata.version("nats-py"),
            "python": platform.python_version(),
            "cores": os.cpu_count(),
            "commit": code_version(),
            "consumers": consumers,
            "alerts": sizes.alerts,
            "readers": min(sizes.readers, consumers),
            "sizes": asdict(sizes),
        },
        "runs": [],
        "aborted": [],
        "nats_logs": {},
    }
    try:
        for replicas in (1, 3):
            r = await measure(root, replicas, consumers, results["aborted"], sizes)
            results["nats_logs"][f"R{replicas}"] = r.pop("nats_log", {})
            results["runs"].append(r)
        if not skip_loss:
            loss = await bounded(
                "node loss", 400, node_loss(root, results["aborted"]), results["aborted"]
            )
            if loss:
                results["nats_logs"]["loss"] = loss.pop("nats_log", {})
                results["node_loss"] = loss
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return results


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Replicas benchmark: what R1 and R3 device consumers cost on a 3-node "
        "cluster, and what happens to each when a node dies (docs/operations.md).",
    )
    parser.add_argument("--consumers", type=int, default=1_000, help="N per replica count")
    out_option(parser)
    parser.add_argument("--skip-loss", action="store_true", help="no node-loss phase")
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not 100 <= args.consumers <= 3_000:
        parser.error("--consumers must be between 100 and 3,000 (2 cores)")
    suffix = f"-n{args.consumers}" if args.consumers != 1_000 else ""
    return run_and_write(
        run(args.consumers, args.skip_loss),
        report,
        args.out,
        lambda when: f"replicas-{when:%Y-%m-%d}{suffix}",
    )


if __name__ == "__main__":
    sys.exit(main())
