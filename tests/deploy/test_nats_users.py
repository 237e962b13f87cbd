"""NATS least privilege (issue 11, core/natsauth.py) on a real nats-server: nobody gets in
without a password, and the engine's user can publish to ingest.alerts and nothing else:
it can neither read ALERTS nor publish an alert past validation."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import orjson
import pytest
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from tocsin.core.embedded import NatsServer
from tocsin.core.naming import Names
from tocsin.core.natsauth import (
    INBOXES,
    authorization_config,
    load_or_create_passwords,
    with_user,
)
from tocsin.core.settings import isolated_settings
from tocsin.core.topology import apply_topology

from ..support import alert, eventually

NAMES = Names("")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[NatsServer, dict[str, str]]]:
    passwords = load_or_create_passwords(tmp_path / "data")
    srv = NatsServer(
        store_dir=tmp_path / "nats", extra_config=authorization_config(NAMES, passwords)
    ).start()
    operator = await nats.connect(with_user(srv.url, "operator", passwords["operator"]))
    await apply_topology(operator.jetstream(), isolated_settings(), NAMES)
    await operator.close()
    yield srv, passwords
    srv.stop()


async def test_nobody_connects_without_a_password(
    server: tuple[NatsServer, dict[str, str]],
) -> None:
    srv, _ = server

    async def quiet(exc: Exception) -> None:
        return None

    for url in (srv.url, with_user(srv.url, "engine", "not-its-password")):
        with pytest.raises((NatsError, OSError)):
            await nats.connect(url, allow_reconnect=False, error_cb=quiet, connect_timeout=3)


async def test_the_engine_may_publish_to_ingest_and_nothing_else(
    server: tuple[NatsServer, dict[str, str]],
) -> None:
    srv, passwords = server
    violations: list[str] = []

    async def record(exc: Exception) -> None:
        violations.append(str(exc))

    engine = await nats.connect(
        with_user(srv.url, "engine", passwords["engine"]),
        error_cb=record,
        inbox_prefix=INBOXES["engine"],  # its PubAcks: the only inboxes it may read
    )
    js = engine.jetstream()
    try:
        event = orjson.dumps(alert("KE-30"))
        ack = await js.publish(NAMES.ingest_subject, event, timeout=5)
        assert ack.stream == NAMES.ingest_stream  # stored for the ingest service
        with pytest.raises((NatsError, JetStreamError)):  # no alert past validation
            await js.publish(NAMES.alert_subject("KE-30", "high", "outbreak_risk"), b"x", timeout=2)
        with pytest.raises((NatsError, JetStreamError)):  # no reading ALERTS
            await js.pull_subscribe(NAMES.alerts_all, durable="snoop", stream=NAMES.alerts_stream)
        with pytest.raises((NatsError, JetStreamError)):
            await js.stream_info(NAMES.alerts_stream)
        assert any("permissions violation" in v.lower() for v in violations), violations
        before = len(violations)
        await engine.subscribe("_INBOX.>")  # nor another party's default inboxes
        await engine.flush()
        await eventually(lambda: len(violations) > before, what="the subscription refused")
    finally:
        await engine.close()
    operator = await nats.connect(with_user(srv.url, "operator", passwords["operator"]))
    try:
        state = (await operator.jetstream().stream_info(NAMES.alerts_stream)).state
        assert state.messages == 0  # nothing reached ALERTS from the engine
    finally:
        await operator.close()


def test_deploy_users_conf_is_what_natsauth_writes() -> None:
    """deploy/nats/users.conf is generated: the permissions of the embedded server and of
    compose's cluster cannot drift apart."""
    written = subprocess.run(
        [sys.executable, "-m", "tocsin.core.natsauth"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    committed = (Path(__file__).resolve().parents[2] / "deploy" / "nats" / "users.conf").read_text()
    assert committed == written, "run: python -m tocsin.core.natsauth > deploy/nats/users.conf"
