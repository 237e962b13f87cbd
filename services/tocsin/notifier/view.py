"""The notifier's view of ``DEVICES``: every device's record and push registration.

One ordered consumer on ``tocsin.devices.>`` from the last message of each subject, then
live: what the gateways write (claims, releases with the device's floor, subscription
changes) and what devices register reaches this view within milliseconds. Nothing is
read per alert from JetStream for the fan-out; only a device due for a push is looked at
again (its queue's ack floor, notifier/app.py).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from tocsin.core.naming import POSITIONS, Names
from tocsin.gateway.device import Record
from tocsin.gateway.push import Registration

log = logging.getLogger(__name__)


class DevicesView:
    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self._js = js
        self._names = names
        self.records: dict[str, Record] = {}
        #: consumer -> (sequence of the registration in DEVICES, the registration)
        self.registrations: dict[str, tuple[int, Registration]] = {}
        self.caught_up = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> None:
        info = await self._js.stream_info(self._names.devices_stream)
        if not info.state.messages:
            self.caught_up.set()
        self._sub = await self._js.subscribe(
            self._names.devices_all,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            cb=self._on,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection is going anyway
                log.debug("devices view: %s", exc)

    async def _on(self, msg: Any) -> None:
        subject: str = msg.subject
        consumer = self._names.consumer_of_devices_subject(subject)
        meta = msg.metadata
        if consumer == POSITIONS:
            pass  # a gateway's positions journal (gateway/journal.py): no device of its own
        elif Names.is_push_subject(subject):
            reg = Registration.parse(msg.data)
            if reg is not None and reg.active:
                self.registrations[consumer] = (meta.sequence.stream, reg)
            else:
                self.registrations.pop(consumer, None)
        else:
            record = Record.parse(consumer, msg.data)
            if record is not None:
                self.records[consumer] = record
        if meta.num_pending == 0:
            self.caught_up.set()

    def registration(self, consumer: str) -> tuple[int, Registration] | None:
        return self.registrations.get(consumer)
