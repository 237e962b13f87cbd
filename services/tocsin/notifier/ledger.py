"""One entry per (device, alert) push in ``PUSH_LEDGER``: what the notifier did about it.

The entry is the last message on ``tocsin.push.ledger.<consumer>.<seq>``; each write is
conditional on the entry it replaces (``Nats-Expected-Last-Subject-Sequence``), so two
notifiers (or two deliveries of one job) never both start the same attempt.

States: ``sending`` (written *before* the request goes out), ``failed`` (a known failure:
an answer or a timeout that will be retried), and the final ``sent``, ``dead`` (kept in
``PUSH_DLQ``) and ``dropped`` (FCM no longer knows the token). A job found at
``sending`` belongs to a notifier that stopped between writing it and recording the
answer: the request may or may not have reached the endpoint. It is never sent again
(no push twice); it is dead-lettered as ``in_doubt`` (docs/reliability.md, "Push").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from tocsin.core.naming import EXPECTED_LAST_HEADER, Names
from tocsin.gateway.records import Conflict, publish_over

TIMEOUT = 2.0

State = Literal["sending", "failed", "sent", "dead", "dropped"]
FINAL: frozenset[str] = frozenset({"sent", "dead", "dropped"})


@dataclass(frozen=True)
class Entry:
    seq: int  # the entry's sequence in PUSH_LEDGER: the next write is conditional on it
    state: str
    attempt: int


class Ledger:
    def __init__(self, js: JetStreamContext, names: Names, nc: Client | None = None) -> None:
        self._js = js
        self._nc = nc
        self._names = names

    async def note(
        self, consumer: str, seq: int, state: State, attempt: int, expected: int
    ) -> None:
        """Write ``state`` without waiting for JetStream's answer (``sent``, just before the
        job's ack on the same connection). Losing it costs nothing once the job is acked; a
        job that comes back anyway finds ``sending`` and is not sent again."""
        if self._nc is None:
            await self.write(consumer, seq, state, attempt, expected)
            return
        await self._nc.publish(
            self._names.push_ledger_subject(consumer, seq),
            orjson.dumps({"state": state, "attempt": attempt}),
            headers={EXPECTED_LAST_HEADER: str(expected)},
        )

    async def write(
        self, consumer: str, seq: int, state: State, attempt: int, expected: int
    ) -> int:
        return await publish_over(
            self._js,
            self._names.push_ledger_subject(consumer, seq),
            orjson.dumps({"state": state, "attempt": attempt}),
            expected,
            TIMEOUT,
            consumer,
        )

    async def read(self, consumer: str, seq: int) -> Entry | None:
        try:
            msg = await self._js.get_last_msg(
                self._names.push_ledger_stream, self._names.push_ledger_subject(consumer, seq)
            )
        except NotFoundError:
            return None
        body = orjson.loads(msg.data or b"{}")
        return Entry(msg.seq or 0, str(body.get("state")), int(body.get("attempt", 0)))

    async def begin(self, consumer: str, seq: int) -> Entry:
        """Record the next attempt as ``sending`` before it is made. Returns the entry
        written, or, when the push is already settled or in doubt, the entry found (its
        ``state`` is not ``sending`` for this caller: see :meth:`Entry`)."""
        try:
            written = await self.write(consumer, seq, "sending", 1, 0)
            return Entry(written, "begun", 1)
        except Conflict:
            pass
        found = await self.read(consumer, seq)
        if found is None:  # written and aged out meanwhile: treat as in doubt
            return Entry(0, "sending", 0)
        if found.state != "failed":
            return found  # final, or sending (in doubt)
        try:
            written = await self.write(consumer, seq, "sending", found.attempt + 1, found.seq)
        except Conflict:  # another delivery of this job began it: in doubt for this one
            return Entry(found.seq, "sending", found.attempt)
        return Entry(written, "begun", found.attempt + 1)
