"""The supervisor's child environment reads back as the same settings; children start,
are watched and stop (real processes)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from tocsin.core.settings import Settings
from tocsin.core.supervisor import (
    Child,
    ChildFailed,
    env_value,
    exited,
    settings_env,
    stop_all,
)

SECRET = "s" * 40


def test_a_child_reads_back_exactly_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings(
        nats_url=["nats://127.0.0.1:1", "nats://127.0.0.1:2"],
        jwt_secret=SECRET,
        http_port=0,
        heartbeat_seconds=0.5,
        redelivery_backoff=[0.25, 1.0],
        alert_types=["heat_wave"],
        duplicate_window_seconds=30.5,
        data_dir=Path("/tmp/x y"),
        log_level="WARNING",
    )
    env = settings_env(settings, base={"PATH": "/bin", "TOCSIN_MAX_DELIVER": "7"})
    assert env["PATH"] == "/bin"
    assert "TOCSIN_MAX_DELIVER" not in env  # the parent's own TOCSIN_* never leak through
    assert "TOCSIN_NAMESPACE" not in env  # a default stays unset
    for key in list(os.environ):
        if key.startswith("TOCSIN_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_overrides_win_and_values_are_spelled_as_the_variables_are() -> None:
    settings = Settings(jwt_secret=SECRET)
    env = settings_env(settings, {"TOCSIN_HTTP_PORT": "9"}, base={})
    assert env == {"TOCSIN_JWT_SECRET": SECRET, "TOCSIN_HTTP_PORT": "9"}
    assert env_value([1.0, 2.5]) == "1.0,2.5"
    assert env_value(True) == "true"


def test_a_child_that_exits_before_it_is_ready_fails_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    code = "import sys; print('no config here'); sys.exit(3)"
    child = Child("probe", [sys.executable, "-c", code], {}, log).start()
    with pytest.raises(ChildFailed, match=r"probe exited \(code 3\)[\s\S]*no config here"):
        child.wait_ready(lambda: False, timeout=30)
    assert exited([child]) == [child]


def test_stop_all_terminates_then_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    stubborn_code = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    )
    polite = Child("polite", [sys.executable, "-c", "import time; time.sleep(60)"], {}).start()
    stubborn = Child("stubborn", [sys.executable, "-c", stubborn_code], {}).start()
    stubborn.wait_ready(ready.exists, timeout=30, what="ignoring SIGTERM")
    killed: list[str] = []
    stop_all([polite, stubborn], grace=1.0, on_kill=lambda c: killed.append(c.name))
    assert killed == ["stubborn"]
    assert polite.returncode == -signal.SIGTERM
    assert stubborn.returncode == -signal.SIGKILL
    assert not polite.running and not stubborn.running


def test_a_cluster_whose_picked_port_was_taken_meanwhile_starts_on_new_ports(
    tmp_path: Path,
) -> None:
    import socket

    from tocsin.core.embedded import NatsCluster

    cluster = NatsCluster(store_dir=tmp_path / "c", size=3, name="taken")
    taken = cluster.nodes[2].cluster_port  # another process binds it before the node does
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        cluster.start(60)
        try:
            assert taken not in [n.cluster_port for n in cluster.nodes]
            assert all(cluster.healthy(i) for i in range(3))
        finally:
            cluster.stop()
