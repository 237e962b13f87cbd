"""A device's record in ``DEVICES``: its position, subscription and owner, one message each.

The record is the last message on ``tocsin.devices.<consumer>`` (the stream keeps one per
subject). It rebuilds a device queue whose node is gone (queue.py), and it says which
session owns the device (ownership.py). Every write is conditional on the sequence of the
record it replaces (``Nats-Expected-Last-Subject-Sequence``), so two writers can never both
believe they wrote the current record: the one that wrote second from a stale sequence is
refused (10071). That refusal is what fences a session that lost its device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from tocsin.core.naming import Names
from tocsin.schemas.subscription import Subscription

log = logging.getLogger(__name__)

#: JetStream's "wrong last sequence": the record changed since the writer read it.
WRONG_LAST_SEQUENCE = 10071
EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
#: How long one record read or write may take.
RECORD_TIMEOUT = 2.0


class Conflict(Exception):
    """The record was written by someone else since the sequence the writer based it on."""


@dataclass(frozen=True)
class Record:
    """A device's record, checked. ``floor`` None: the device's queue was never opened (its
    first connection got as far as claiming it); such a record rebuilds nothing."""

    user: str
    client_id: str
    floor: int | None = None
    sent: int = 0
    subscription: Subscription = field(default_factory=Subscription)
    owner: str | None = None  # the session id that owns the device, None: nobody
    gateway: str | None = None  # the gateway instance of that session
    legacy: bool = False  # written by a version before ownership (no ``owner`` key)

    def body(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "client_id": self.client_id,
            "floor": self.floor,
            "sent": self.sent,
            "subscription": self.subscription.as_dict(),
            "owner": self.owner,
            "gateway": self.gateway,
        }

    def owned_by(self, owner: str | None, gateway: str | None) -> Record:
        return replace(self, owner=owner, gateway=gateway if owner else None, legacy=False)

    @classmethod
    def parse(cls, name: str, data: bytes) -> Record | None:
        """The record, checked; an unreadable one counts as none (logged). Records written
        before ownership existed have no ``owner``: nobody owns them."""
        try:
            body = orjson.loads(data or b"{}")
            floor = body["floor"]
            owner = body.get("owner")
            gateway = body.get("gateway")
            if not (owner is None or isinstance(owner, str)):
                raise ValueError(f"owner: {owner!r}")
            if not (gateway is None or isinstance(gateway, str)):
                raise ValueError(f"gateway: {gateway!r}")
            return cls(
                user=str(body["user"]),
                client_id=str(body["client_id"]),
                floor=None if floor is None else int(floor),
                sent=int(body.get("sent", 0)),
                subscription=Subscription.model_validate(body["subscription"]),
                owner=owner,
                gateway=gateway,
                legacy="owner" not in body,
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("%s: unreadable record in DEVICES (%s); treated as none", name, exc)
            return None


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
        try:
            ack = await self._js.publish(
                self._names.device_record_subject(name),
                orjson.dumps(record.body()),
                timeout=RECORD_TIMEOUT,
                headers={EXPECTED_LAST: str(expected)},
            )
        except BadRequestError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                raise Conflict(name) from None
            raise
        return ack.seq
