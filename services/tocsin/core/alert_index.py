"""Alerts by id: the ``ALERT_INDEX`` stream, one subject per alert and kind, the last
message per subject kept for the retention (docs/architecture.md, "Alert index").

* ``tocsin.index.at.<id>``: ``{"seq": N}``, where the alert is in ``ALERTS`` (written by the
  ingest path right after the append; ``GET /api/v1/alerts/{alert_id}`` reads it).
* ``tocsin.index.superseded.<id>``: ``{"by": "<id>", "seq": N}``, the update or cancel at
  ``ALERTS`` seq N that replaces the alert (written right after that append). An alert at
  seq S is superseded when such an entry has N > S: only a *later* alert supersedes.
* ``tocsin.index.held.<id>``: a CAP message whose status is not Actual (Exercise, Test,
  System): the alert JSON, with its CAP details in the ``Tocsin-Cap`` header. It is never
  appended to ``ALERTS``, so no device receives it; roles admin, analyst and publisher read
  it by id.

A redelivered ingest event writes the same entries again (idempotent). Between an update's
append and its ``superseded`` entry there are milliseconds in which a device reading its
backlog may still get the old alert; it then gets the update right after it, as an online
device does.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, PubAck
from nats.js.errors import NotFoundError

from tocsin.schemas import Alert

from .naming import CAP_HEADER, Names

log = logging.getLogger(__name__)

AT, SUPERSEDED, HELD = "at", "superseded", "held"


async def index_appended(js: JetStreamContext, names: Names, alert: Alert, seq: int) -> None:
    """Record where ``alert`` is in ``ALERTS`` and, for an update or cancel, what it replaces."""
    stream = names.index_stream
    writes = [
        js.publish(names.index_subject(AT, alert.msg_id), orjson.dumps({"seq": seq}), stream=stream)
    ]
    if alert.supersedes:
        body = orjson.dumps({"by": alert.msg_id, "seq": seq})
        writes += [
            js.publish(names.index_subject(SUPERSEDED, ref), body, stream=stream)
            for ref in alert.referenced_ids
        ]
    await asyncio.gather(*writes)


async def hold(js: JetStreamContext, names: Names, data: bytes, cap_header: str) -> PubAck:
    """Keep a non-Actual CAP alert out of ``ALERTS``, readable by id."""
    alert_id = orjson.loads(data)["alert_id"]
    return await js.publish(
        names.index_subject(HELD, str(alert_id)),
        data,
        headers={CAP_HEADER: cap_header},
        stream=names.index_stream,
    )


async def _last(js: JetStreamContext, names: Names, kind: str, alert_id: str) -> Any:
    try:
        return await js.get_last_msg(
            names.index_stream, names.index_subject(kind, alert_id), direct=True
        )
    except NotFoundError:
        return None


@dataclass(frozen=True)
class StoredAlert:
    """An alert read back by id: its JSON as stored, its headers, where it is."""

    data: bytes
    headers: dict[str, str]
    seq: int | None  # in ALERTS; None: held (not Actual)
    superseded_by: str | None = None
    stored_at: datetime | None = None  # when ALERTS (or the index, for a held one) stored it

    @property
    def held(self) -> bool:
        return self.seq is None


async def lookup(js: JetStreamContext, names: Names, alert_id: str) -> StoredAlert | None:
    """The alert ``alert_id`` (an integer id as its decimal string), or None: a direct get
    by subject in the index (any replica answers), then ``ALERTS`` by seq."""
    at = await _last(js, names, AT, alert_id)
    if at is None:
        held = await _last(js, names, HELD, alert_id)
        if held is None:
            return None
        return StoredAlert(held.data, dict(held.headers or {}), None, None, held.time)
    seq = int(orjson.loads(at.data)["seq"])
    try:
        msg = await js.get_msg(names.alerts_stream, seq)  # ALERTS has no direct gets: its leader
    except NotFoundError:
        return None  # aged out of ALERTS (or deleted) before its index entry
    by = await superseded_by(js, names, alert_id, seq)
    return StoredAlert(msg.data or b"", dict(msg.headers or {}), seq, by, msg.time)


async def superseded_by(js: JetStreamContext, names: Names, alert_id: str, seq: int) -> str | None:
    """The id of the later alert that superseded the one at ``seq`` (one direct get), or None.
    For one-off checks (the push notifier, HTTP); a gateway's backlog uses
    :class:`Supersessions`."""
    entry = await _last(js, names, SUPERSEDED, alert_id)
    if entry is None:
        return None
    body = orjson.loads(entry.data)
    return str(body["by"]) if int(body["seq"]) > seq else None


class Supersessions:
    """Every ``superseded`` entry of the index, in memory, kept current by an ordered consumer
    (one per process; an entry is a few dozen bytes, and only updates and cancels write
    them). :meth:`is_superseded` is a dict look-up: cheap enough for every backlog alert.
    Correct across restarts (rebuilt from the replicated stream at start, before the caller
    serves anything) and in a cluster (the stream is the truth, R as ``ALERTS``)."""

    def __init__(self) -> None:
        #: superseded alert id -> (seq, id) of its latest superseder
        self._by: dict[str, tuple[int, str]] = {}
        self._sub: Any = None
        self.entries_read = 0

    def is_superseded(self, alert_id: str, seq: int) -> bool:
        """A later alert than the one at ``seq`` (``ALERTS``) superseded ``alert_id``: the
        hook for every path that must not deliver a superseded alert (backlog, push)."""
        return self.superseder(alert_id, seq) is not None

    def superseder(self, alert_id: str, seq: int) -> str | None:
        """The id of the later alert that superseded ``alert_id`` (at ``seq``), or None."""
        by = self._by.get(alert_id)
        return by[1] if by is not None and by[0] > seq else None

    def note(self, alert_id: str, by_seq: int, by_id: str) -> None:
        if by_seq > self._by.get(alert_id, (0, ""))[0]:
            self._by[alert_id] = (by_seq, by_id)

    def __len__(self) -> int:
        return len(self._by)

    async def start(self, js: JetStreamContext, names: Names, timeout: float = 10.0) -> None:
        """Subscribe, and return once every entry that existed at the call was read."""
        wildcard = names.index_kind_all(SUPERSEDED)
        try:
            last = await js.get_last_msg(names.index_stream, wildcard)
            target = int(last.seq or 0)
        except NotFoundError:
            target = 0
        caught_up = asyncio.Event()
        seen = {"seq": 0}
        if target == 0:
            caught_up.set()

        async def on_msg(msg: Msg) -> None:
            self.entries_read += 1
            try:
                body = orjson.loads(msg.data)
                alert_id = names.parse_index_subject(msg.subject)[1]
                self.note(alert_id, int(body["seq"]), str(body["by"]))
            except (ValueError, KeyError, TypeError):
                log.warning("unreadable index entry on %s", msg.subject)
            seen["seq"] = msg.metadata.sequence.stream
            if seen["seq"] >= target:
                caught_up.set()

        self._sub = await js.subscribe(
            wildcard,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            idle_heartbeat=1.0,
            stream=names.index_stream,
        )
        try:
            await asyncio.wait_for(caught_up.wait(), timeout)
        except TimeoutError:
            log.warning("superseded index: read %d entries, not all in %.0fs", len(self), timeout)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                log.debug("supersessions unsubscribe failed", exc_info=True)
            self._sub = None
