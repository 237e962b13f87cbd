"""The notifier killed with SIGKILL mid-batch, then restarted: no push lost, none twice.

What is guaranteed precisely (docs/reliability.md, "Push notifications"): a push whose
ledger entry was written ``sending`` when the notifier died may or may not have reached the
endpoint; it is never sent again but kept in ``PUSH_DLQ`` as ``in_doubt``. Every other push
is sent exactly once after the restart."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tocsin.bench.pushsink import PushSink
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.supervisor import settings_env

from ..support import append, eventually, spawn_tocsin, start_gateway
from .conftest import Stack
from .test_push import dlq, high

pytestmark = pytest.mark.timeout(120)

DEVICES = 20


async def settled(js: JetStreamContext, names: Names, consumer: str, seq: int) -> str | None:
    try:
        msg = await js.get_last_msg(
            names.push_ledger_stream, names.push_ledger_subject(consumer, seq)
        )
    except NotFoundError:
        return None
    return str(orjson.loads(msg.data or b"{}")["state"])


async def test_sigkill_mid_batch_loses_nothing_and_pushes_nothing_twice(
    push_settings: Callable[..., Settings],
    endpoints: PushSink,
    js: JetStreamContext,
    names: Names,
    tmp_path: Path,
) -> None:
    settings = push_settings(push_concurrency=4, push_timeout_seconds=1.0)
    stack = Stack(settings, endpoints, await start_gateway(settings))
    tokens = {names.device_consumer(f"u{i}", "phone"): f"fcm-k{i}" for i in range(DEVICES)}
    try:
        for i in range(DEVICES):
            await stack.offline_device(f"u{i}", f"fcm-k{i}")
        env = settings_env(settings)
        proc = spawn_tocsin(["notifier"], env, tmp_path / "notifier-1.log")

        async def planner_ready() -> bool:
            try:
                await js.consumer_info(names.alerts_stream, names.notifier_consumer)
                await js.consumer_info(names.push_stream, names.push_consumer)
            except NotFoundError:
                return False
            return True

        await eventually(planner_ready, 30, "the notifier's durables")
        endpoints.hold = asyncio.Event()  # requests wait: the kill finds them in flight
        ack = await append(js, names, high(9001))
        await eventually(lambda: len(endpoints.pushes) >= 1, 20, "the first request in flight")
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        in_flight = {p.token for p in endpoints.pushes}
        endpoints.hold.set()  # those requests reached "FCM": answered to a dead client

        restarted = spawn_tocsin(["notifier"], env, tmp_path / "notifier-2.log")
        try:

            async def all_settled() -> bool:
                states = [await settled(js, names, c, ack.seq) for c in tokens]
                return all(s in ("sent", "dead") for s in states)

            await eventually(all_settled, 60, "every device's push settled")
        finally:
            restarted.send_signal(signal.SIGTERM)
            await asyncio.to_thread(restarted.wait, 20)

        letters = [orjson.loads(m.data) for m in await dlq(js, names)]
        in_doubt = {tokens[d["consumer"]] for d in letters if d["reason"] == "in_doubt"}
        assert {d["reason"] for d in letters} <= {"in_doubt"}
        for consumer, fcm_token in tokens.items():
            requests = endpoints.requests_for(fcm_token)
            assert len(requests) <= 1, f"{fcm_token} pushed {len(requests)} times"
            state = await settled(js, names, consumer, ack.seq)
            if fcm_token in in_doubt:
                assert state == "dead"
            else:  # no loss: pushed, exactly once
                assert state == "sent" and len(requests) == 1, fcm_token
        # In doubt are only requests begun when the notifier died: at most its concurrency,
        # and each of those that reached the endpoint was among the requests in flight.
        assert len(in_doubt) <= 4
        assert in_doubt >= in_flight
        assert len(in_doubt) < DEVICES  # the rest were pushed after the restart
    finally:
        await stack.gateway.stop()
