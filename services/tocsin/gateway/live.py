"""The live path: one ordered consumer per gateway process, fanned out in memory.

Every alert is read from JetStream once per gateway, its frame encoded once, and offered
to each local session whose filters match. Sessions that are still reading their backlog
buffer what they are offered, so that the hand-over to live delivery has no gap
(docs/architecture.md, "Session state machine").
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from tocsin.core.naming import EXPIRES_HEADER, Names
from tocsin.core.natspy import ordered_resume_after
from tocsin.schemas import Alert

log = logging.getLogger(__name__)

#: The live feed's idle heartbeat. nats-py re-creates the ordered consumer after two missed
#: ones, so after a NATS restart live delivery resumes within 2-4 heartbeats of JetStream
#: being back (chaos suite: 2 s gave 5.8-8.6 s worst delays).
FEED_HEARTBEAT_SECONDS = 1.0


def alert_frame(seq: int, data: bytes, redelivered: bool) -> bytes:
    """An ``alert`` frame around the stored alert JSON, without parsing or re-encoding it."""
    flag = b"true" if redelivered else b"false"
    return b'{"type":"alert","seq":%d,"redelivered":%s,"alert":%s}' % (seq, flag, data)


_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one whole WebSocket text frame as a server sends it (RFC 6455 §5.2:
    FIN, opcode 1, no mask, no extension bits): what aiohttp's writer puts on the socket
    for an uncompressed ``send_frame``, built once per alert instead of once per device."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _LEN2(0x81, 126, n) + payload
    return _LEN3(0x81, 127, n) + payload


#: The WebSocket ping the ticker sends (no payload), as it goes on the socket.
PING_FRAME = b"\x89\x00"


@dataclass(slots=True)
class LiveAlert:
    seq: int
    subject: str
    data: bytes
    expires: float | None
    appended: float = 0.0  # unix time ALERTS stored it (0: unknown)
    frame: bytes = field(default=b"")
    #: ``frame`` with its WebSocket header: written as is to every socket that takes it
    #: straight from the feed (Session._write_now).
    wire: bytes = field(default=b"")
    _alert: Alert | None = None

    def __post_init__(self) -> None:
        self.frame = alert_frame(self.seq, self.data, False)
        self.wire = text_frame(self.frame)

    def parsed(self) -> Alert:
        """The alert as a model, parsed once per gateway when a subscription needs it."""
        if self._alert is None:
            self._alert = Alert.model_validate_json(self.data)
        return self._alert

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


def expires_of(headers: dict[str, str] | None) -> float | None:
    value = (headers or {}).get(EXPIRES_HEADER)
    return float(value) if value else None


class Listener(Protocol):
    countries: frozenset[str] | None  # None = every country

    def accepts(self, subject: str) -> bool: ...

    def offer(self, alert: LiveAlert) -> None: ...


class LiveFeed:
    def __init__(self, js: JetStreamContext, names: Names) -> None:
        self._js = js
        self._names = names
        self._by_country: dict[str, set[Listener]] = {}
        self._everywhere: set[Listener] = set()
        self._sub: Any = None
        self.last_seq = 0
        self.received = 0

    async def start(self) -> None:
        info = await self._js.stream_info(self._names.alerts_stream)
        self.last_seq = info.state.last_seq
        self._sub = await self._js.subscribe(
            self._names.alerts_all,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            idle_heartbeat=FEED_HEARTBEAT_SECONDS,
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1 << 30,
        )
        # Before the first alert, a reconnect would replay the whole stream (natspy.py).
        ordered_resume_after(self._sub, self.last_seq)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection may be closing already
                log.debug("feed unsubscribe failed", exc_info=True)
            self._sub = None

    @property
    def running(self) -> bool:
        return self._sub is not None

    def register(self, listener: Listener) -> None:
        for bucket in self._buckets(listener.countries):
            bucket.add(listener)

    def unregister(self, listener: Listener) -> None:
        for bucket in self._buckets(listener.countries):
            bucket.discard(listener)

    def _buckets(self, countries: Iterable[str] | None) -> list[set[Listener]]:
        if countries is None:
            return [self._everywhere]
        return [self._by_country.setdefault(c, set()) for c in countries]

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        stored = meta.timestamp.timestamp()
        alert = LiveAlert(
            meta.sequence.stream, msg.subject, msg.data, expires_of(msg.headers), stored
        )
        self.dispatch(alert)

    def dispatch(self, alert: LiveAlert) -> None:
        self.last_seq = alert.seq
        self.received += 1
        if alert.expired(time.time()):
            return
        country = self._names.parse_alert_subject(alert.subject)[0][:2]
        for listener in (*self._by_country.get(country, ()), *self._everywhere):
            if listener.accepts(alert.subject):
                listener.offer(alert)
