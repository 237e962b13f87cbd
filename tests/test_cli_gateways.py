"""``tocsin run`` with ``TOCSIN_GATEWAYS=2``: two gateway processes on one port
(SO_REUSEPORT), each also on a port of its own; a real nats-server, real processes, real
sockets. And the settings' checks of the gateways' ports."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from tocsin.core.auth import mint_token
from tocsin.schemas.samples import alert_body

from . import test_cli
from .test_cli import SECRET, _start_run, _wait_ready, clean_env, lines, tocsin, wait_until

run_env = test_cli.run_env  # the fixture: a data dir, free ports, the run's leftovers killed

WS = "/api/v1/alerts/ws"
SPREAD = 24  # devices through the shared port: all on one process by chance is 2^-23


def _metric(port: int, name: str) -> tuple[float, str]:
    """One gauge of a gateway process (its own port) and the instance it says it is."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    value = next(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " "))
    instance = re.search(r'tocsin_gateway_info\{instance="([^"]+)"\}', text)
    assert instance is not None, text
    return value, instance.group(1)


def _own_ports(banner: str) -> dict[str, int]:
    return {
        name: int(port)
        for name, port in re.findall(r"(gateway-\d) \(pid \d+\) http://127\.0\.0\.1:(\d+)", banner)
    }


def _token(user: str) -> str:
    return mint_token(SECRET, user, regions=["KE"], ttl_seconds=600)


async def _connect(
    http: aiohttp.ClientSession, port: int, user: str, client_id: str = "phone"
) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(
        f"ws://127.0.0.1:{port}{WS}",
        params={"auth_token": _token(user), "client_id": client_id, "ack_mode": "auto"},
    )
    first = await ws.receive_json(timeout=30)
    assert first["type"] == "connection_established", first
    return ws


async def _next_alert(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    async with asyncio.timeout(30):
        while True:
            frame = await ws.receive_json()
            if frame["type"] == "alert":
                alert: dict[str, object] = frame["alert"]
                return alert


async def _exercise(http_port: int, own: dict[str, int]) -> None:
    one, two = own["gateway-1"], own["gateway-2"]
    async with aiohttp.ClientSession() as http:
        # Through the shared port: the kernel spreads the connections over both processes,
        # which each count their own (their own ports answer for themselves alone).
        spread = [await _connect(http, http_port, f"spread-{i}") for i in range(SPREAD)]
        counts = {}

        def counted() -> bool:
            counts.update({p: _metric(p, "tocsin_gateway_connections")[0] for p in (one, two)})
            return sum(counts.values()) == SPREAD

        await asyncio.to_thread(wait_until, counted, f"{SPREAD} connections counted")
        assert counts[one] > 0 and counts[two] > 0, counts
        # Two processes, two gateway ids (their device records, journals and leases).
        ids = {_metric(p, "tocsin_gateway_nats_connected")[1] for p in (one, two)}
        assert len(ids) == 2, ids
        for ws in spread:
            await ws.close()

        # A device on gateway-1 connects again on gateway-2: the second process takes it
        # over, the first closes its socket with 4009 (replaced).
        old = await _connect(http, one, "carol")
        new = await _connect(http, two, "carol")
        closed = await old.receive(timeout=30)
        assert closed.type is aiohttp.WSMsgType.CLOSE and old.close_code == 4009, closed

        # An alert reaches devices on both processes.
        other = await _connect(http, one, "dave")
        body = alert_body("KE-30")
        admin = mint_token(SECRET, "ops", roles=["admin"], regions=["KE"], ttl_seconds=600)
        async with http.post(
            f"http://127.0.0.1:{http_port}/api/v1/alerts",
            json=body,
            headers={"Authorization": f"Bearer {admin}"},
        ) as r:
            assert r.status in (200, 201, 202), await r.text()
            sent = await r.json()
        got = await asyncio.gather(_next_alert(new), _next_alert(other))
        assert [a["alert_id"] for a in got] == [body["alert_id"]] * 2, (got, sent)
        await new.close()
        await other.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading")
def test_run_with_two_gateways_shares_the_port(
    tmp_path: Path, run_env: tuple[dict[str, str], Path, int]
) -> None:
    env, data, http_port = run_env
    env.update(TOCSIN_GATEWAYS="2", TOCSIN_JWT_SECRET=SECRET, TOCSIN_INGEST_METRICS_PORT="0")
    run_log = tmp_path / "run.log"
    run = _start_run(env, tmp_path, run_log)
    try:
        _wait_ready(run, run_log, http_port)
        wait_until(lambda: "Ctrl-C stops everything" in run_log.read_text(), "the banner")
        banner = run_log.read_text()
        own = _own_ports(banner)
        assert sorted(own) == ["gateway-1", "gateway-2"], banner
        assert f"2 processes share port {http_port}" in banner
        # The banner comes once both are ready, not just the one the shared port found.
        for port in own.values():
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                f"http://127.0.0.1:{port}/readyz", timeout=5
            ) as r:
                assert r.status == 200
        # tocsin status hears both (over NATS, not through the shared port).
        status = tocsin(
            "status",
            "--json",
            "--gateways",
            "2",
            env=env | {"TOCSIN_NATS_URL": _operator_url(data, int(env["TOCSIN_NATS_PORT"]))},
            cwd=tmp_path,
        )
        assert status.returncode == 0, status.stderr
        assert len(json.loads(status.stdout)["gateways"]["replies"]) == 2, status.stdout

        asyncio.run(_exercise(http_port, own))

        run.send_signal(signal.SIGINT)
        assert run.wait(30) == 0, run_log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def _operator_url(data: Path, nats_port: int) -> str:
    from tocsin.core.natsauth import load_or_create_passwords, with_user

    password = load_or_create_passwords(data)["operator"]
    return with_user(f"nats://127.0.0.1:{nats_port}", "operator", password)


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_bad_gateways_count_names_the_setting(tmp_path: Path, value: str) -> None:
    env = clean_env(
        TOCSIN_GATEWAYS=value, TOCSIN_NATS_URL="nats://127.0.0.1:1", TOCSIN_JWT_SECRET=SECRET
    )
    out = tocsin("gateway", env=env, cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_GATEWAYS" in line and repr(value) in line


def test_own_port_equal_to_the_shared_one_is_refused(tmp_path: Path) -> None:
    env = clean_env(
        TOCSIN_HTTP_PORT="8090",
        TOCSIN_GATEWAY_METRICS_PORT="8090",
        TOCSIN_NATS_URL="nats://127.0.0.1:1",
        TOCSIN_JWT_SECRET=SECRET,
    )
    out = tocsin("gateway", env=env, cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_GATEWAY_METRICS_PORT" in line and "TOCSIN_HTTP_PORT" in line


def test_run_refuses_own_ports_over_the_shared_one(tmp_path: Path) -> None:
    env = clean_env(
        TOCSIN_GATEWAYS="3",
        TOCSIN_HTTP_PORT="18091",
        TOCSIN_GATEWAY_METRICS_PORT="18090",
        TOCSIN_DATA_DIR=str(tmp_path),
    )
    out = tocsin("run", env=env, cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_GATEWAY_METRICS_PORT 18090" in line and "TOCSIN_HTTP_PORT 18091" in line
