"""tocsin.core.natspy reaches into nats-py where it has no public call: an upgrade that
moves what it uses must fail here, not silently change behaviour."""

from __future__ import annotations

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from tocsin.core.naming import Names
from tocsin.core.natspy import drop_unsent, ordered_resume_after


def test_nats_py_still_keeps_unsent_commands_where_drop_unsent_looks() -> None:
    nc = Client()
    nc._pending.append(b"PUB x 1\r\n1\r\n")
    nc._pending_data_size = 13
    drop_unsent(nc)
    assert nc._pending == [] and nc._pending_data_size == 0


async def test_an_ordered_consumer_still_keeps_its_last_sequence_where_we_set_it(
    js: JetStreamContext, names: Names
) -> None:
    async def ignore(msg: object) -> None:
        return None

    sub = await js.subscribe(
        names.alerts_all, cb=ignore, ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    try:
        assert ordered_resume_after(sub, 41)
        jsi = sub._sub._jsi
        assert jsi is not None and jsi._sseq == 41  # nats-py resumes from it + 1
        assert not ordered_resume_after(sub, 7)  # only before the first message
    finally:
        await sub.unsubscribe()
