"""Reads and writes of device records in ``DEVICES`` (the record itself: device.py).

The record is the last message on ``tocsin.devices.<consumer>`` (the stream keeps one per
subject). It rebuilds a device queue whose node is gone (queue.py), and it says which
session owns the device (ownership.py). Every write is conditional on the sequence of the
record it replaces (``Nats-Expected-Last-Subject-Sequence``), so two writers can never both
believe they wrote the current record: the one that wrote second from a stale sequence is
refused (10071). That refusal is what fences a session that lost its device.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from tocsin.core.naming import EXPECTED_LAST_HEADER, Names

from .device import Record

log = logging.getLogger(__name__)

#: JetStream's "wrong last sequence": the record changed since the writer read it.
WRONG_LAST_SEQUENCE = 10071
#: How long one record read or write may take.
RECORD_TIMEOUT = 2.0


class Conflict(Exception):
    """The record was written by someone else since the sequence the writer based it on."""


async def publish_over(
    js: JetStreamContext, subject: str, data: bytes, expected: int, timeout: float, name: str
) -> int:
    """Publish ``data`` as ``subject``'s next message only if its last one is at sequence
    ``expected`` (0: it has none); return the new sequence. Raises :class:`Conflict`
    (naming ``name``) when someone else wrote it since: the compare-and-set of device
    records, push registrations and the push ledger."""
    try:
        ack = await js.publish(
            subject, data, timeout=timeout, headers={EXPECTED_LAST_HEADER: str(expected)}
        )
    except BadRequestError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            raise Conflict(name) from None
        raise
    return ack.seq


class DeviceRecords:
    """Reads and conditional writes of device records; one instance per gateway process."""

    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self._js = js
        self._names = names

    async def read(self, name: str) -> tuple[int, Record | None]:
        """The record's sequence (0: none) and the record (None: none or unreadable)."""
        try:
            msg = await self._js.get_last_msg(
                self._names.devices_stream, self._names.device_record_subject(name)
            )
        except NotFoundError:
            return 0, None
        return msg.seq or 0, Record.parse(name, msg.data or b"")

    async def recorded(self, name: str) -> dict[str, Any] | None:
        """The record as stored (None: none), for operators and tests."""
        try:
            msg = await self._js.get_last_msg(
                self._names.devices_stream, self._names.device_record_subject(name)
            )
        except NotFoundError:
            return None
        body: dict[str, Any] = orjson.loads(msg.data or b"{}")
        return body

    async def write(self, name: str, record: Record, expected: int) -> int:
        """Replace the record whose sequence is ``expected`` (0: there is none); return the
        new record's sequence. Raises :class:`Conflict` when the record is not that one."""
        return await publish_over(
            self._js,
            self._names.device_record_subject(name),
            orjson.dumps(record.body()),
            expected,
            RECORD_TIMEOUT,
            name,
        )
