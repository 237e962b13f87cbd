"""A device's durable JetStream consumer: its offline queue and its acknowledged position.

Positions are ``ALERTS`` stream sequences. The consumer's ack floor is the device's
position: everything at or below it was acknowledged by the device. tocsin moves it with
JetStream's own ack (``AckAll``) while reading the backlog, and with the consumer reset API
(``$JS.API.CONSUMER.RESET``, nats-server 2.14+) for alerts that went out by the live path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, ReplayPolicy
from nats.js.errors import NotFoundError, ServiceUnavailableError

from tocsin.core.coarse import coarse_filters
from tocsin.core.naming import CLIENT_ID_KEY, SENT_KEY, SUBSCRIPTION_KEY, USER_KEY, Names
from tocsin.core.settings import Settings
from tocsin.schemas.subscription import Filters, Subscription

from .device import Position, Record
from .recovery import truncation_target

log = logging.getLogger(__name__)


def _own_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """Consumer metadata without the keys the server adds (``_nats.*``)."""
    return {k: v for k, v in (metadata or {}).items() if not k.startswith("_nats")}


class QueueError(Exception):
    """JetStream refused an operation on a device queue."""


#: JetStream's "consumer already exists" (a create with action ``create`` of another config).
CONSUMER_EXISTS = 10148
#: What asking for a consumer whose (R1) node is down looks like (measured on 2.15.1: a
#: request timeout for CONSUMER.INFO, no responders for a fetch), as opposed to a 404.
UNREACHABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)
#: How long a rebuild keeps asking the meta group to remove the old queue (measured: 11 s
#: after a kill when the stream's leader died with the node, as it re-elects first).
REBUILD_SECONDS = 30.0
#: A connected device's record is rewritten by the ticker at most this often, when its floor
#: moved (and every quarter retention regardless, Session.record_due): close to the device's
#: position, so a rebuild repeats little. 10,000 live devices: up to ~170 writes/s.
RECORD_SECONDS = 60.0


@dataclass(frozen=True)
class Opened:
    """What :meth:`DeviceQueues.open` found: where delivery resumes and what was skipped."""

    consumer: str
    position: Position  # where delivery resumes; ``sent``: what earlier connections sent
    pending: int  # alerts waiting in the backlog, after truncation
    dropped: int  # alerts skipped because the backlog was over the cap
    created: bool  # first time this device was seen: it starts at the live edge
    subscription: Subscription = field(default_factory=Subscription)


def _filters_of(config: ConsumerConfig) -> list[str]:
    one = [config.filter_subject] if config.filter_subject else []
    return list(config.filter_subjects or one)


def _stored_subscription(name: str, metadata: dict[str, str] | None) -> Subscription:
    text = (metadata or {}).get(SUBSCRIPTION_KEY)
    if not text:
        return Subscription()
    try:
        return Subscription.from_json(text)
    except ValueError as exc:  # written by hand or by another version: fail open, loudly
        log.warning("%s: unreadable %s (%s); no groups or filters", name, SUBSCRIPTION_KEY, exc)
        return Subscription()


def at_floor(info: ConsumerInfo, floor: int) -> bool:
    """The consumer stands exactly where a reset to ``floor + 1`` would put it: it has
    delivered nothing past ``floor`` and holds nothing unacknowledged (a clean close saved
    it there, or a live device's checkpoint did and nothing was read since). Its
    ``num_pending`` is then what the reset would answer."""
    delivered = info.delivered.stream_seq if info.delivered else 0
    return delivered == floor and not info.num_ack_pending and not info.num_redelivered


class DeviceQueues:
    """Operations on device consumers; one instance per gateway process."""

    def __init__(self, nc: Client, js: JetStreamContext, settings: Settings, names: Names) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._names = names
        self._stream = names.alerts_stream
        self.rebuilt = 0  # queues recreated from their record (node down, or queue missing)

    def _tuned(self) -> dict[str, Any]:
        """The consumer fields that follow the settings; the rest are fixed at creation
        (replicas included)."""
        s = self._settings
        return {
            "backoff": list(s.redelivery_backoff),
            "max_deliver": s.max_deliver,
            "max_ack_pending": s.max_inflight,
            "inactive_threshold": s.retention_seconds,
        }

    def _config(
        self,
        name: str,
        user: str,
        client_id: str,
        start_seq: int,
        metadata: dict[str, str] | None = None,
    ) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=name,
            description=f"tocsin device queue of {user!r} / {client_id!r}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
            ack_policy=AckPolicy.ALL,
            replay_policy=ReplayPolicy.INSTANT,
            num_replicas=self._settings.device_replicas,
            metadata={**(metadata or {}), USER_KEY: user, CLIENT_ID_KEY: client_id},
            **self._tuned(),
        )

    @staticmethod
    def _with_filters(config: ConsumerConfig, filters: list[str]) -> ConsumerConfig:
        """One filter goes in ``filter_subject`` (as ``nats consumer info`` shows it best)."""
        one = len(filters) == 1
        config.filter_subject = filters[0] if one else None
        config.filter_subjects = None if one else sorted(filters)
        return config

    async def open(
        self,
        user: str,
        client_id: str,
        regions: tuple[str, ...] | None,
        filters: Filters | None = None,
        recorded: Record | None = None,
        journaled: Position | None = None,
        live_from: int | None = None,
    ) -> Opened:
        """Find or create the device's queue, bring its subscription and subject filters up to
        date, rewind it to its acknowledged position and cut its backlog to
        ``TOCSIN_OFFLINE_QUEUE_MAX`` (newest kept). ``filters`` (from the connect's query)
        replace the stored ones; None keeps them. ``recorded``: the device's record, read
        when its session claimed it; only a record with a floor can rebuild the queue.
        ``journaled``: the device's position in its last owner's positions journal (that
        owner did not let go: journal.py); delivery resumes past its floor if it is ahead.
        ``live_from``: the live feed's last seq when the session began buffering its
        alerts (handler.serve); a new device's queue starts right after it, so every alert
        the session may have been offered is in the queue (none falls between), without
        asking the stream for its last seq. The caller owns the device (ownership.py) and
        writes its record.
        """
        if recorded is not None and recorded.floor is None:
            recorded = None
        name = self._names.device_consumer(user, client_id)
        if recorded is None and live_from is not None:
            # No record: most likely a new device. Create its queue outright (one request
            # instead of CONSUMER.INFO, STREAM.INFO and the create); JetStream refuses the
            # create if a queue of that name exists (a record lost, a create whose answer
            # was lost), and then the queue is opened as it stands.
            subscription = Subscription(filters=filters or Filters())
            if await self._create(name, user, client_id, live_from + 1, subscription, regions):
                return Opened(name, Position(live_from), 0, 0, True, subscription)
        try:
            info = await self._js.consumer_info(self._stream, name)
        except NotFoundError:
            # Gone, but recorded (a rebuild cut short after its delete, a queue deleted by
            # hand): it comes back from its record, not at the live edge, so nothing the
            # device has not acked is skipped. Only a device without a record is new.
            if recorded is None:
                subscription = Subscription(filters=filters or Filters())
                if live_from is not None:
                    last = live_from
                else:
                    last = (await self._js.stream_info(self._stream)).state.last_seq
                if not await self._create(name, user, client_id, last + 1, subscription, regions):
                    raise QueueError(f"{name} was created meanwhile") from None  # reconnect
                return Opened(name, Position(last), 0, 0, True, subscription)
            await self._create_from(name, user, client_id, regions, recorded)
            info = await self._js.consumer_info(self._stream, name)
        except UNREACHABLE as exc:
            if self._settings.device_replicas > 1:
                raise  # a replicated queue elects a new leader by itself: retry later
            info = await self._rebuild(name, user, client_id, regions, recorded, exc)

        subscription = _stored_subscription(name, info.config.metadata)
        if filters is not None:
            subscription = Subscription(groups=subscription.groups, filters=filters)
        changed = await self._apply(info.config, subscription, regions)
        start_seq = info.config.opt_start_seq or 1
        floor = max(info.ack_floor.stream_seq if info.ack_floor else 0, start_seq - 1)
        ahead = journaled is not None and journaled.floor > floor
        if journaled is not None and ahead:
            floor = journaled.floor  # acked by the device: the queue had not heard yet
        if not changed and not ahead and at_floor(info, floor):
            pending = int(info.num_pending or 0)  # a reset would change nothing
        else:
            pending = await self.reset(name, floor + 1)
        dropped = 0
        cap = self._settings.offline_queue_max
        if pending > cap:
            stream = await self._js.stream_info(self._stream)
            target = await truncation_target(
                lambda seq: self.reset(name, seq), floor + 1, stream.state.last_seq + 1, cap
            )
            before = await self.reset(name, floor + 1)
            after = await self.reset(name, target)
            dropped, pending = before - after, after
            floor = target - 1
        sent = int((info.config.metadata or {}).get(SENT_KEY, "0") or 0)
        if recorded is not None:
            sent = max(sent, recorded.sent)
        if journaled is not None:
            sent = max(sent, journaled.sent)
        return Opened(name, Position(floor, sent), pending, dropped, False, subscription)

    async def _create(
        self,
        name: str,
        user: str,
        client_id: str,
        start_seq: int,
        subscription: Subscription,
        regions: tuple[str, ...] | None,
    ) -> bool:
        """Create the queue at ``start_seq`` (``$JS.API.CONSUMER.CREATE`` with action
        ``create``: never an update of a queue that exists). False if one exists and is
        not what this create would have made (it is then opened as it stands)."""
        metadata = {SUBSCRIPTION_KEY: subscription.to_json()}
        config = self._config(name, user, client_id, start_seq, metadata)
        subjects = coarse_filters(self._names, subscription, regions)
        config = self._with_filters(config, subjects)
        request = {"stream_name": self._stream, "config": config.as_dict(), "action": "create"}
        reply = await self._nc.request(
            f"$JS.API.CONSUMER.CREATE.{self._stream}.{name}", orjson.dumps(request), timeout=5
        )
        body = orjson.loads(reply.data)
        error = body.get("error")
        if error is not None:
            if error.get("err_code") == CONSUMER_EXISTS:
                return False
            raise QueueError(f"create {name}: {error.get('description')}")
        # The same config as one that exists is no error: it must also stand at its start.
        info = ConsumerInfo.from_response(body)
        return at_floor(info, start_seq - 1)

    async def _create_from(
        self,
        name: str,
        user: str,
        client_id: str,
        regions: tuple[str, ...] | None,
        recorded: Record,
    ) -> None:
        assert recorded.floor is not None
        await self._create(
            name,
            user,
            client_id,
            recorded.floor + 1,
            recorded.subscription,
            regions,  # the current token bounds it, whatever the record says
        )
        self.rebuilt += 1
        log.warning("rebuilt the queue of %s from its record at floor %d", name, recorded.floor)

    async def _rebuild(
        self,
        name: str,
        user: str,
        client_id: str,
        regions: tuple[str, ...] | None,
        recorded: Record | None,
        cause: Exception,
    ) -> ConsumerInfo:
        """The device's R1 queue does not answer: its node is down (docs/operations.md §3).
        Delete it through the meta group (the request may time out; it takes effect) and
        create it again on a live node from the device's record. A node loss may also take
        the leaders of ``ALERTS`` and ``DEVICES`` with it; they re-elect within seconds, so
        each pass is retried until ``REBUILD_SECONDS``. Each pass first asks the queue
        again: one that answers (its node is back, or another gateway rebuilt it) is used
        as it is, and only one that times out is deleted."""
        if recorded is None:
            raise QueueError(f"{name} does not answer and has no record")
        deadline = time.monotonic() + REBUILD_SECONDS
        timed_out = True  # the caller's CONSUMER.INFO did
        while True:
            try:
                if timed_out:
                    with contextlib.suppress(*UNREACHABLE, NotFoundError):
                        await self._js.delete_consumer(self._stream, name)
                try:
                    info: ConsumerInfo = await self._js.consumer_info(self._stream, name)
                except NotFoundError:
                    await self._create_from(name, user, client_id, regions, recorded)
                    info = await self._js.consumer_info(self._stream, name)
                return info
            except nats.errors.TimeoutError:
                timed_out = True
            except UNREACHABLE:  # no responders, 503: no leader yet; nothing to delete
                timed_out = False
            if time.monotonic() > deadline:
                raise QueueError(f"{name} does not answer and could not be rebuilt") from cause
            await asyncio.sleep(0.2)  # no responders comes back at once: do not spin

    async def _apply(
        self, config: ConsumerConfig, subscription: Subscription, regions: tuple[str, ...] | None
    ) -> bool:
        """Store ``subscription``, its subject filters and the current queue settings on the
        consumer, in place (JetStream keeps the delivery and ack state); nothing is sent when
        all are current. True when something was sent (the filters may have changed what
        is pending)."""
        subjects = coarse_filters(self._names, subscription, regions)
        metadata = _own_metadata(config.metadata)
        stored = subscription.to_json()
        tuned = self._tuned()
        current = (
            sorted(_filters_of(config)) == subjects
            and metadata.get(SUBSCRIPTION_KEY) == stored
            and all(getattr(config, key) == value for key, value in tuned.items())
        )
        if current:
            return False
        metadata[SUBSCRIPTION_KEY] = stored
        config.metadata = metadata
        for key, value in tuned.items():
            setattr(config, key, value)
        await self._js.add_consumer(self._stream, self._with_filters(config, subjects))
        return True

    async def subscribe(
        self, consumer: str, subscription: Subscription, regions: tuple[str, ...] | None
    ) -> None:
        """A connected device changed its subscription: persist it and narrow or widen the
        queue's subject filters to match."""
        info = await self._js.consumer_info(self._stream, consumer)
        await self._apply(info.config, subscription, regions)

    async def reset(self, consumer: str, seq: int) -> int:
        """Point ``consumer`` at stream sequence ``seq`` (everything before counts as acked);
        return how many alerts are then pending."""
        subject = self._names.consumer_reset_api(self._stream, consumer)
        reply = await self._nc.request(subject, orjson.dumps({"seq": seq}), timeout=5)
        body = orjson.loads(reply.data)
        if "error" in body:
            raise QueueError(f"reset {consumer} to {seq}: {body['error'].get('description')}")
        return int(body.get("num_pending", 0))

    async def pending(self, consumer: str) -> int:
        info = await self._js.consumer_info(self._stream, consumer)
        return int(info.num_pending or 0)

    async def read_through(self, consumer: str, seq: int, act: Callable[[], None]) -> bool:
        """``consumer`` has given its reader everything of the stream up to ``seq`` that its
        filters select, so a session may go live on a feed that has every alert after it.

        Its pending count alone cannot say so on a cluster: a node back from a restart
        answers for its queues with nothing pending (and empty fetches) before its copy of
        the stream has caught up (docs/reliability.md, "A queue node back from a restart").
        What the node itself reports settles it: ``delivered.stream_seq`` is how far the
        queue has looked in that node's copy (a pull moves it to the end of the copy when
        nothing more matches). Short of ``seq``, the stream's leader (a non-direct get)
        tells whether anything the queue selects lies between; if so the queue owes it,
        whatever its node says now. Unknown (a node or the leader not answering): False.
        ``act`` is called before the requests (the session's ownership check)."""
        if self._settings.replicas <= 1 and self._settings.device_replicas <= 1:
            return True  # one copy of the stream: the queue's pending count is the truth
        act()
        try:
            info = await self._js.consumer_info(self._stream, consumer)
            looked = info.delivered.stream_seq if info.delivered else 0
            if looked >= seq:
                return True
            for subject in _filters_of(info.config) or [self._names.alerts_all]:
                try:
                    found = await self._js.get_msg(self._stream, looked + 1, subject, next=True)
                except NotFoundError:
                    continue  # nothing of this filter after ``looked``
                if found.seq is None or found.seq <= seq:
                    return False
        except UNREACHABLE:
            return False
        return True

    async def reader(self, consumer: str) -> JetStreamContext.PullSubscription:
        return await self._js.pull_subscribe_bind(durable=consumer, stream=self._stream)
