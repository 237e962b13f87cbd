"""deploy/nats/nats.conf, the file compose.yaml mounts into every node, run for real: three
nats-server processes on loopback, parametrised by the same environment variables."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.api import StreamConfig

from tocsin.core.embedded import free_port, server_binary, stop_process, wait_for_port
from tocsin.core.natsauth import with_user

from .compose import ROOT, environment, load

CONFIG = ROOT / "deploy" / "nats" / "nats.conf"
NODES = ("nats-1", "nats-2", "nats-3")


def config_variables(path: Path = CONFIG) -> set[str]:
    """The ``$NAME`` references of a nats-server config and the files it includes,
    comments left out."""
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())
    bare = re.sub(r'"[^"]*"', '""', text)  # "$JS.API.>" is a subject: quoted, no variable
    names = set(re.findall(r"\$([A-Za-z_][A-Za-z0-9_]*)", bare))
    for included in re.findall(r"^\s*include\s+(\S+)", text, re.M):
        names |= config_variables(path.parent / included)
    return names


@dataclass
class Node:
    name: str
    env: dict[str, str]
    client_port: int
    monitor_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [server_binary(), "-c", str(CONFIG)],
                env=self.env,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        wait_for_port("127.0.0.1", self.client_port, 20, alive=self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def monitor(self, path: str) -> tuple[int, Any]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://127.0.0.1:{self.monitor_port}{path}"
        try:
            with opener.open(url, timeout=2) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, OSError):
            return 0, None


def loopback_env(tmp: Path) -> list[dict[str, str]]:
    """compose.yaml's environment for each node, with loopback addresses, free ports and
    temporary stores in place of the container's (everything else as compose says)."""
    services = load()["services"]
    client, monitor, route = ([free_port() for _ in NODES] for _ in range(3))
    routes = "[" + ", ".join(f"nats-route://127.0.0.1:{p}" for p in route) + "]"
    base = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    envs = []
    for i, node in enumerate(NODES):
        env = environment(services[node])
        env.update(
            NATS_HOST="127.0.0.1",
            NATS_CLIENT_PORT=str(client[i]),
            NATS_MONITOR_PORT=str(monitor[i]),
            NATS_ROUTE_PORT=str(route[i]),
            NATS_ROUTES=routes,
            NATS_STORE_DIR=json.dumps(str(tmp / node)),  # quoted: paths may hold spaces
        )
        envs.append(base | env)
    return envs


def check_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [server_binary(), "-t", "-c", str(CONFIG)],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_config_reads_the_variables_compose_sets() -> None:
    assert config_variables() == {
        "NATS_SERVER_NAME",
        "NATS_HOST",
        "NATS_CLIENT_PORT",
        "NATS_MONITOR_PORT",
        "NATS_ROUTE_PORT",
        "NATS_ROUTES",
        "NATS_STORE_DIR",
        "NATS_ENGINE_PASSWORD",
        "NATS_INGEST_PASSWORD",
        "NATS_GATEWAY_PASSWORD",
        "NATS_OPERATOR_PASSWORD",
    }


def test_nats_server_accepts_the_config_with_the_compose_environment(tmp_path: Path) -> None:
    for env in loopback_env(tmp_path):
        result = check_config(env)
        assert result.returncode == 0, result.stderr
        assert "is valid" in result.stderr + result.stdout
    # The container's own values (0.0.0.0, fixed ports, /data) parse too.
    for node in NODES:
        env = environment(load()["services"][node])
        result = check_config({**os.environ, **env})
        assert result.returncode == 0, result.stderr


def test_nats_server_refuses_the_config_without_a_variable_or_with_a_bad_one(
    tmp_path: Path,
) -> None:
    env = loopback_env(tmp_path)[0]
    missing = {k: v for k, v in env.items() if k != "NATS_ROUTES"}
    result = check_config(missing)
    assert result.returncode != 0 and "NATS_ROUTES" in result.stderr
    result = check_config(env | {"NATS_CLIENT_PORT": "four"})
    assert result.returncode != 0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[list[Node]]:
    nodes = [
        Node(
            name=env["NATS_SERVER_NAME"],
            env=env,
            client_port=int(env["NATS_CLIENT_PORT"]),
            monitor_port=int(env["NATS_MONITOR_PORT"]),
            log=tmp_path / f"{env['NATS_SERVER_NAME']}.log",
        )
        for env in loopback_env(tmp_path)
    ]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            if node.process is not None:
                stop_process(node.process, 10)


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def meta_leader(nodes: list[Node]) -> str | None:
    """The JetStream meta leader every running node agrees on, once all report healthy."""
    leaders = set()
    for node in nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        status, _ = node.monitor("/healthz")
        code, jsz = node.monitor("/jsz")
        if status != 200 or code != 200:
            return None
        meta = jsz.get("meta_cluster") or {}
        if meta.get("cluster_size") != len(nodes):
            return None
        leaders.add(meta.get("leader"))
    return leaders.pop() if len(leaders) == 1 and None not in leaders else None


@pytest.mark.cluster
async def test_the_config_forms_a_cluster_whose_r3_stream_survives_a_killed_node(
    cluster: list[Node],
) -> None:
    leader = wait_for(lambda: meta_leader(cluster), 30, "a JetStream meta leader")
    assert leader in NODES
    _, varz = cluster[0].monitor("/varz")
    assert varz["server_name"] == "nats-1" and varz["cluster"]["name"] == "tocsin"
    assert len(varz["cluster"]["urls"]) >= 2  # routes to the two others

    password = cluster[0].env["NATS_OPERATOR_PASSWORD"]  # nobody gets in without one
    nc = await nats.connect(
        [with_user(n.url, "operator", password) for n in cluster], max_reconnect_attempts=-1
    )
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(
            StreamConfig(name="DEPLOYCHECK", subjects=["deploycheck.>"], num_replicas=3)
        )
        for i in range(10):
            await js.publish(f"deploycheck.{i}", b"x")
        info = await js.stream_info("DEPLOYCHECK")
        assert info.config.num_replicas == 3
        placed = info.cluster
        assert placed is not None, "an R3 stream in a cluster has cluster info"
        replicas = {placed.leader, *(r.name for r in placed.replicas or [])}
        assert replicas == set(NODES)

        # Kill the node that leads the stream: the two others elect a new leader. Ask
        # them directly (the first connection may have been to the victim).
        victim = next(n for n in cluster if n.name == placed.leader)
        victim.kill()
        survivors = await nats.connect(
            [with_user(n.url, "operator", password) for n in cluster if n is not victim]
        )
        try:
            js = survivors.jetstream(timeout=2)

            async def survived() -> bool:
                try:
                    state = await js.stream_info("DEPLOYCHECK")
                except Exception:
                    return False
                leader = state.cluster.leader if state.cluster else None
                return leader not in (None, victim.name) and state.state.messages == 10

            deadline = time.monotonic() + 30
            while not await survived():
                assert time.monotonic() < deadline, "the R3 stream did not survive a killed node"
                await asyncio.sleep(0.1)
            ack = await js.publish("deploycheck.after", b"y")
            assert ack.seq == 11
        finally:
            await survivors.close()
    finally:
        await nc.close()
