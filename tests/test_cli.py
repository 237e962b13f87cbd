"""The ``tocsin`` command, run as a real process: tokens, settings errors, publish, and
one end-to-end ``tocsin run`` (embedded nats-server, ingest, gateway) with tail + publish."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest

from tocsin.cli import format_frame
from tocsin.core.embedded import free_port

SECRET = "cli-test-secret-0123456789abcdef-0123456789"
DEADLINE = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any TOCSIN_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOCSIN_")}
    env.update(extra)
    return env


def tocsin(
    *args: str, env: dict[str, str], cwd: Path, stdin: str | None = None, timeout: float = DEADLINE
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tocsin", *args],
        env=env,
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def wait_until(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``check`` until true; fail after ``timeout`` (never sleep to synchronise)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------- token


def test_token_has_the_claims(tmp_path: Path) -> None:
    env = clean_env(TOCSIN_JWT_SECRET=SECRET)
    out = tocsin(
        "token",
        "--user",
        "alice",
        "--roles",
        "health_worker,analyst",
        "--regions",
        "KE,UG-102",
        "--ttl",
        "600",
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["roles"] == ["health_worker", "analyst"]
    assert claims["regions"] == ["KE", "UG-102"]
    assert claims["exp"] - claims["iat"] == 600
    assert abs(claims["iat"] - time.time()) < 60


def test_token_falls_back_to_the_dev_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "dev-secret").write_text(SECRET + "\n")
    out = tocsin("token", "--user", "bob", env=clean_env(TOCSIN_DATA_DIR=str(data)), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    claims = jwt.decode(out.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "bob" and claims["roles"] == ["health_worker"]


def test_token_without_any_secret_says_so(tmp_path: Path) -> None:
    out = tocsin(
        "token", "--user", "bob", env=clean_env(TOCSIN_DATA_DIR=str(tmp_path / "d")), cwd=tmp_path
    )
    assert out.returncode == 2
    assert len(lines(out.stderr)) == 1 and "TOCSIN_JWT_SECRET" in out.stderr


def test_token_refuses_unknown_roles_and_bad_regions(tmp_path: Path) -> None:
    env = clean_env(TOCSIN_JWT_SECRET=SECRET)
    out = tocsin("token", "--user", "a", "--roles", "boss", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "'boss'" in out.stderr
    out = tocsin("token", "--user", "a", "--regions", "kenya", env=env, cwd=tmp_path)
    assert out.returncode == 2 and "'kenya'" in out.stderr


# --------------------------------------------------------------------------- settings


def test_bad_setting_stops_the_gateway_with_one_line(tmp_path: Path) -> None:
    env = clean_env(
        TOCSIN_HTTP_PORT="abc", TOCSIN_NATS_URL="nats://127.0.0.1:1", TOCSIN_JWT_SECRET=SECRET
    )
    out = tocsin("gateway", env=env, cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_HTTP_PORT" in line


def test_gateway_without_nats_url_says_so(tmp_path: Path) -> None:
    out = tocsin("gateway", env=clean_env(TOCSIN_JWT_SECRET=SECRET), cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_NATS_URL" in line


def test_ingest_without_nats_url_says_so(tmp_path: Path) -> None:
    out = tocsin("ingest", env=clean_env(), cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_NATS_URL" in line


# --------------------------------------------------------------------------- publish


def test_publish_validates_locally_naming_the_field(tmp_path: Path) -> None:
    # Nothing listens: the alert must be refused before any connection is tried.
    env = clean_env(TOCSIN_JWT_SECRET=SECRET, TOCSIN_HTTP_PORT=str(free_port()))
    out = tocsin(
        "publish", "--region", "kenya", "--title", "t", "--message", "m", env=env, cwd=tmp_path
    )
    assert out.returncode == 2
    assert "location.region" in out.stderr and out.stdout == ""


def test_publish_json_from_stdin_rejects_unknown_fields(tmp_path: Path) -> None:
    body = {
        "alert_id": 7,
        "alert_level": "high",
        "alert_type": "outbreak_risk",
        "title": "t",
        "message": "m",
        "location": {"region": "KE"},
        "colour": "red",
    }
    out = tocsin(
        "publish",
        "--json",
        "-",
        env=clean_env(TOCSIN_JWT_SECRET=SECRET),
        cwd=tmp_path,
        stdin=json.dumps(body),
    )
    assert out.returncode == 2 and "colour" in out.stderr


def test_publish_needs_a_region_or_json(tmp_path: Path) -> None:
    out = tocsin("publish", "--title", "t", env=clean_env(TOCSIN_JWT_SECRET=SECRET), cwd=tmp_path)
    assert out.returncode == 2 and "--region" in out.stderr


def test_publish_to_nothing_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(TOCSIN_JWT_SECRET=SECRET, TOCSIN_HTTP_PORT=str(port))
    out = tocsin("publish", "--region", "KE", env=env, cwd=tmp_path)
    assert out.returncode == 1
    [line] = lines(out.stderr)
    assert f"127.0.0.1:{port}" in line


def test_publish_via_nats_to_nothing_fails_clearly(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(TOCSIN_NATS_URL=f"nats://127.0.0.1:{port}")
    out = tocsin("publish", "--via", "nats", "--region", "KE", env=env, cwd=tmp_path)
    assert out.returncode == 1  # it used to retry the first connect forever
    [line] = lines(out.stderr)
    assert "cannot connect to NATS" in line and f"127.0.0.1:{port}" in line


def test_run_refuses_one_port_for_nats_and_http(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(
        TOCSIN_HTTP_PORT=str(port), TOCSIN_NATS_PORT=str(port), TOCSIN_DATA_DIR=str(tmp_path)
    )
    out = tocsin("run", env=env, cwd=tmp_path)
    assert out.returncode == 2
    [line] = lines(out.stderr)
    assert "TOCSIN_NATS_PORT" in line and "TOCSIN_HTTP_PORT" in line


def test_format_frame_prints_alerts_on_one_line() -> None:
    frame = {
        "type": "alert",
        "seq": 4,
        "redelivered": True,
        "alert": {
            "alert_id": 9,
            "alert_level": "high",
            "alert_type": "outbreak_risk",
            "title": "Rising",
            "message": "m",
            "location": {"region": "KE-30"},
        },
    }
    assert format_frame(frame) == (
        'alert seq=4 level=high region=KE-30 type=outbreak_risk id=9 title="Rising" (redelivered)'
    )
    assert json.loads(format_frame({"type": "ping", "ts": 1.5})) == {"type": "ping", "ts": 1.5}


# --------------------------------------------------------------------------- tocsin run


def _processes_marked(marks: list[str]) -> list[int]:
    """Live processes (not zombies) whose command line or environment holds one of ``marks``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            text = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if state != "Z" and any(m.encode() in text for m in marks):
            found.append(int(entry.name))
    return found


def _start_run(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    """``tocsin run`` in its own process group (killpg stops every child), logging to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tocsin", "run"],
            env=env,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_ready(run: subprocess.Popen[bytes], log: Path, http_port: int) -> None:
    """Until the gateway's /readyz is 200; fails with the log if ``tocsin run`` exits first."""
    wait_until(
        lambda: run.poll() is not None or _readyz(http_port) == 200,
        "GET /readyz = 200",
        timeout=60,
    )
    assert run.poll() is None, log.read_text()


def _readyz(port: int) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def run_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], Path, int]]:
    data = (tmp_path / "data").resolve()
    http_port = free_port()
    env = clean_env(
        TOCSIN_DATA_DIR=str(data),
        TOCSIN_HTTP_PORT=str(http_port),
        TOCSIN_NATS_PORT=str(free_port()),
        TOCSIN_SHUTDOWN_GRACE_SECONDS="5",
    )
    yield env, data, http_port
    # Whatever a failed test left behind (all of it carries the data dir): kill it.
    if sys.platform.startswith("linux"):
        for pid in _processes_marked([str(data)]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stream_peers(nats_port: int, stream: str, data: Path) -> tuple[int, list[str]]:
    """Replicas and the servers holding ``stream``, asked over NATS as the operator (the
    embedded server's users are in the data dir)."""
    import asyncio

    import nats

    from tocsin.core.natsauth import load_or_create_passwords, with_user

    password = load_or_create_passwords(data)["operator"]
    url = with_user(f"nats://127.0.0.1:{nats_port}", "operator", password)

    async def ask() -> tuple[int, list[str]]:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(stream)
        finally:
            await nc.close()
        cluster = info.cluster
        assert cluster is not None
        peers = [cluster.leader or ""] + [r.name or "" for r in cluster.replicas or []]
        return info.config.num_replicas or 1, sorted(peers)

    return asyncio.run(ask())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks use /proc")
@pytest.mark.parametrize("cluster", [1, pytest.param(3, marks=pytest.mark.cluster)])
def test_run_end_to_end_tail_publish_and_clean_stop(
    tmp_path: Path, run_env: tuple[dict[str, str], Path, int], cluster: int
) -> None:
    env, data, http_port = run_env
    env["TOCSIN_CLUSTER"] = str(cluster)
    run_log = tmp_path / "run.log"
    run = _start_run(env, tmp_path, run_log)
    try:
        _wait_ready(run, run_log, http_port)
        wait_until(lambda: "Ctrl-C stops everything" in run_log.read_text(), "the banner")
        banner = run_log.read_text()
        assert f"ws://127.0.0.1:{http_port}/api/v1/alerts/ws" in banner
        assert "tail --user alice --regions KE" in banner
        # the page, with the development sign-in (the dev secret was made here)
        assert f"http://127.0.0.1:{http_port}/   (development sign-in on)" in banner
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{http_port}/api/v1/web/config", timeout=5) as r:
            assert json.load(r)["dev_sign_in"] is True
        if cluster > 1:  # TOCSIN_CLUSTER=3: three nodes, streams replicated on all of them
            assert banner.count("nats://127.0.0.1:") >= 3
            nats_port = int(env["TOCSIN_NATS_PORT"])
            nodes = [f"tocsin-n{i}" for i in (1, 2, 3)]
            assert _stream_peers(nats_port, "ALERTS", data) == (3, nodes)
            assert _stream_peers(nats_port, "INGEST", data) == (3, nodes)

        # The dev secret: generated once, private, printed. The NATS users' passwords too.
        secret_file = data / "dev-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "nats-users.json").stat().st_mode) == 0o600
        for party, password in json.loads((data / "nats-users.json").read_text()).items():
            assert password not in banner, f"the {party} user's NATS password reached a log line"
        assert secret_file.read_text().strip() in banner

        # A device that connects first, then two alerts: one over HTTP, one over NATS.
        tail_log = tmp_path / "tail.log"
        with open(tail_log, "wb") as out:
            tail = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tocsin",
                    "tail",
                    "--user",
                    "alice",
                    "--regions",
                    "KE",
                    "--count",
                    "2",
                ],
                env=env,
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(
                lambda: tail.poll() is not None or "connection_established" in tail_log.read_text(),
                "tail connected",
            )
            assert tail.poll() is None, tail_log.read_text()

            sent = tocsin(
                "publish",
                "--region",
                "KE-30",
                "--level",
                "high",
                "--title",
                "Malaria outbreak risk rising",
                "--message",
                "Risk model predicts a rise in cases",
                env=env,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            first = json.loads(sent.stdout)
            assert first["seq"] >= 1

            sent = tocsin(
                "publish",
                "--via",
                "nats",
                "--region",
                "KE",
                "--level",
                "critical",
                "--title",
                "Cholera cases reported",
                "--message",
                "m",
                env=env,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            second = json.loads(sent.stdout)
            assert second["stream"] == "INGEST"

            assert tail.wait(DEADLINE) == 0, tail_log.read_text()
        finally:
            if tail.poll() is None:
                tail.kill()
                tail.wait()
        printed = [line for line in tail_log.read_text().splitlines() if line.startswith("alert ")]
        assert len(printed) == 2, tail_log.read_text()
        assert f"seq={first['seq']} " in printed[0]
        assert f"id={first['alert_id']} " in printed[0]
        assert 'title="Malaria outbreak risk rising"' in printed[0]
        assert f"id={second['alert_id']} " in printed[1] and "level=critical" in printed[1]

        # A bad token is refused at the handshake with the server's JSON error.
        refused = tocsin("tail", "--token", "not-a-token", env=env, cwd=tmp_path)
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["error"] == "malformed_token"

        # Ctrl-C: everything stops, nats-server included.
        run.send_signal(signal.SIGINT)
        assert run.wait(DEADLINE) == 0, run_log.read_text()
        wait_until(lambda: not _processes_marked([str(data)]), "no nats-server/ingest/gateway left")
        assert "tocsin: stopped" in run_log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()


def _consumer_exists(nats_port: int, stream: str, consumer: str, data: Path) -> bool:
    import asyncio

    import nats
    from nats.js.errors import NotFoundError

    from tocsin.core.natsauth import load_or_create_passwords, with_user

    password = load_or_create_passwords(data)["operator"]
    url = with_user(f"nats://127.0.0.1:{nats_port}", "operator", password)

    async def ask() -> bool:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().consumer_info(stream, consumer)
            return True
        except NotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(ask())


def _register_and_leave(http_port: int, auth_token: str, fcm_token: str) -> dict[str, object]:
    """A device that connects, registers for push and leaves: offline, with a registration."""
    import asyncio

    import aiohttp

    async def device() -> dict[str, object]:
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{http_port}/api/v1/alerts/ws",
                params={"auth_token": auth_token, "client_id": "phone"},
            ) as ws,
        ):
            assert (await ws.receive_json())["type"] == "connection_established"
            await ws.send_json({"type": "register_push", "provider": "fcm", "token": fcm_token})
            answer: dict[str, object] = await ws.receive_json()
            return answer

    return asyncio.run(device())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks use /proc")
def test_run_with_a_push_url_pushes_to_an_offline_device(
    tmp_path: Path, run_env: tuple[dict[str, str], Path, int]
) -> None:
    """`make run` with TOCSIN_PUSH_URL at a local recorder (tocsin.bench.pushsink) starts
    the notifier, and an offline device with a registration gets a push."""
    env, data, http_port = run_env
    sink_port = free_port()
    sink_log = tmp_path / "sink.log"
    with open(sink_log, "wb") as out:
        sink = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tocsin.bench.pushsink",
                "--port",
                str(sink_port),
                "--credentials",
                str(tmp_path / "service-account.json"),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    run_log = tmp_path / "run.log"
    try:
        wait_until(lambda: "TOCSIN_PUSH_URL=" in sink_log.read_text(), "the recorder")
        env["TOCSIN_PUSH_URL"] = (
            f"http://127.0.0.1:{sink_port}/v1/projects/tocsin-test/messages:send"
        )
        env["TOCSIN_PUSH_CREDENTIALS"] = str(tmp_path / "service-account.json")
        env["TOCSIN_PUSH_AFTER_SECONDS"] = "1"
        env["TOCSIN_NOTIFIER_METRICS_PORT"] = "0"
        run = _start_run(env, tmp_path, run_log)
        try:
            _wait_ready(run, run_log, http_port)
            nats_port = int(env["TOCSIN_NATS_PORT"])
            wait_until(
                lambda: (
                    run.poll() is not None
                    or _consumer_exists(nats_port, "ALERTS", "notifier", data)
                ),
                "the notifier's durable",
            )
            assert run.poll() is None, run_log.read_text()
            secret = (data / "dev-secret").read_text().strip()
            nurse = jwt.encode(
                {"sub": "nurse", "regions": ["KE"], "exp": time.time() + 600}, secret, "HS256"
            )
            answer = _register_and_leave(http_port, nurse, "demo-fcm-token")
            assert answer == {"type": "push_registered", "provider": "fcm", "client_id": "phone"}
            sent = tocsin(
                "publish",
                "--region",
                "KE-30",
                "--level",
                "critical",
                "--title",
                "Cholera",
                env=env,
                cwd=tmp_path,
            )
            assert sent.returncode == 0, sent.stderr
            alert_id = json.loads(sent.stdout)["alert_id"]
            wait_until(
                lambda: f"push: token=demo-fcm-token alert_id={alert_id}" in sink_log.read_text(),
                "the push at the recorder",
            )
            run.send_signal(signal.SIGINT)
            assert run.wait(DEADLINE) == 0, run_log.read_text()
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
    finally:
        sink.terminate()
        sink.wait(DEADLINE)
