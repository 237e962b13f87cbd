"""The notifier: push notifications to offline devices, one per (device, alert) (CONTRACT §6).

A faststream app with two pull subscribers:

1. **Planner**, durable ``notifier`` on ``ALERTS`` (from the live edge when first
   created). Every alert is looked at once: below ``TOCSIN_PUSH_MIN_LEVEL``, expired or
   not :func:`pushable` it is skipped; before it is due (``TOCSIN_PUSH_AFTER_SECONDS``
   after its append) it is nacked with the delay that remains, so JetStream hands it back
   when it is due. Then every device with a registration whose subscription and token
   select it (``Subscription.matches``, the gateway's predicate) gets a job on
   ``tocsin.push.jobs.<consumer>.<seq>`` (stream ``PUSH``, ``Nats-Msg-Id`` = consumer and
   seq, so planning an alert again after a crash adds no job), and the alert is acked.
2. **Pusher**, durable ``notifier-push`` on ``PUSH``, ``TOCSIN_PUSH_CONCURRENCY`` jobs at
   once. A job is skipped when the device has received the alert (its floor, from its
   record or its queue's ack floor, is at or past the seq), deferred (nacked, looked at
   again) while the device is connected to a live gateway, and otherwise pushed: the
   ledger entry is written ``sending`` first, then the request is made, then the answer is
   recorded and the job acked. Failures are retried through JetStream redelivery (nack with
   a delay: exponential backoff with jitter, at least ``Retry-After``); after
   ``TOCSIN_PUSH_MAX_ATTEMPTS`` the push lands in ``PUSH_DLQ``. 400 and other 4xx go to
   ``PUSH_DLQ`` at once; 404 ``UNREGISTERED`` drops the registration.

Why that order and what it guarantees: docs/reliability.md, "Push notifications".
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import datetime
from typing import Any
from weakref import WeakKeyDictionary

import orjson
from aiohttp import web
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.nats.subscriber.usecases.stream_pull_subscriber import PullStreamSubscriber
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from pydantic import ValidationError

from tocsin.core.alert_index import Supersessions
from tocsin.core.logs import log_context
from tocsin.core.naming import MSG_ID_HEADER, Names
from tocsin.core.natsauth import connect_options
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology
from tocsin.gateway.device import Record
from tocsin.gateway.journal import Journal
from tocsin.gateway.push import PushRegistrations
from tocsin.ingest.app import _faststream_logger, _fetch_timeouts_as_documented
from tocsin.ingest.metrics import serve
from tocsin.schemas import Alert, AlertLevel
from tocsin.schemas.subscription import Subscription

from . import fcm
from .ledger import FINAL, Ledger
from .metrics import NotifierCounters, metrics_app
from .view import DevicesView

log = logging.getLogger(__name__)

#: Seconds before a fetched job or alert is handed out again when its notifier died.
PUSH_ACK_WAIT_MARGIN = 5.0
#: Jobs published at once while planning one alert.
PLAN_CHUNK = 256
#: The longest retry delay.
MAX_BACKOFF_SECONDS = 600.0
REASON_HEADER = "Tocsin-Reason"
DETAIL_HEADER = "Tocsin-Detail"


def pushable(
    alert: Alert, seq: int, supersessions: Supersessions, now: datetime | None = None
) -> str | None:
    """Whether ``alert`` (at ``seq`` in ``ALERTS``) may be pushed at all: None, or the
    reason it may not.

    The one place for rules about the alert itself (not the device): an expired alert is
    never pushed, nor one that a later update or cancel superseded (CAP; the same index the
    gateway's backlog reads, core/alert_index.py). Checked when the push is planned and
    again just before it is sent, so an update that came in between stops it.
    """
    if alert.is_expired(now):
        return "expired"
    if supersessions.is_superseded(alert.msg_id, seq):
        return "superseded"
    return None


def retry_delay(
    attempt: int, base: float, retry_after: float | None, rng: Any = random.random
) -> float:
    """Seconds before attempt ``attempt + 1``: ``base * 2^(attempt-1)``, capped, with equal
    jitter (between half and all of it, so each delay is at least the last one's floor),
    and never less than the endpoint's ``Retry-After``."""
    step = float(min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1)))
    delay = step / 2 + float(rng()) * step / 2
    return max(delay, retry_after or 0.0)


def _exact(record: Record | None) -> bool:
    """The record's floor is the device's: written by the release (no owner) after the
    session's last save, and nothing moves a queue nobody owns. Otherwise (no record, a
    queue never opened, an owner: connected, or its gateway died) the queue's ack floor,
    or the owner's positions journal, may be further."""
    return record is not None and record.floor is not None and not record.owner


class Notifier:
    """The notifier's state and its two handlers (the faststream app wires them)."""

    def __init__(self, settings: Settings, counters: NotifierCounters) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.counters = counters
        self.min_rank = AlertLevel(settings.push_min_level).rank
        bearer = fcm.Bearer(settings.push_credentials) if settings.push_credentials else None
        self.bearer = bearer
        counters.token_refreshes = lambda: bearer.refreshes if bearer else 0
        self.sender = fcm.Sender(
            settings.push_url or "",
            bearer,
            settings.push_concurrency,
            settings.push_timeout_seconds,
        )
        self._js: JetStreamContext | None = None
        self.supersessions = Supersessions()  # superseded alerts are not pushed
        self.view: DevicesView | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self._js is not None
        return self._js

    async def start(self, js: JetStreamContext, nc: Client | None = None) -> None:
        self._js = js
        self.ledger = Ledger(js, self.names, nc)
        self.journal = Journal(js, self.names, "notifier")  # read only: gateways' positions
        self.registrations = PushRegistrations(js, self.names)
        await self.supersessions.start(js, self.names)  # read whole before any alert
        self.view = DevicesView(js, self.names)
        await self.view.start()
        view = self.view
        self.counters.registrations = lambda: len(view.registrations)
        await self.sender.start()

    async def stop(self) -> None:
        await self.sender.stop()
        await self.supersessions.stop()
        if self.view is not None:
            await self.view.stop()

    @property
    def recheck_seconds(self) -> float:
        """How soon a push deferred while its device was connected is looked at again."""
        return max(0.5, min(self.settings.push_after_seconds, 30.0))

    # ------------------------------------------------------------ 1. the planner
    async def on_alert(self, message: NatsMessage) -> None:
        raw = message.raw_message
        meta = raw.metadata
        seq = meta.sequence.stream
        assert self.view is not None
        await self.view.caught_up.wait()
        _, level, _ = self.names.parse_alert_subject(raw.subject)
        if level not in AlertLevel._value2member_map_ or AlertLevel(level).rank < self.min_rank:
            self.counters.skipped["below_level"] += 1
            await message.ack()
            return
        appended = meta.timestamp.timestamp()
        due_in = appended + self.settings.push_after_seconds - time.time()
        if due_in > 0:
            await message.nack(delay=due_in)
            return
        try:
            alert = Alert.model_validate_json(raw.data)
        except ValidationError as exc:
            log.warning("alert seq %s does not parse; not pushed: %s", seq, exc)
            await message.ack()
            return
        reason = pushable(alert, seq, self.supersessions)
        if reason is not None:
            self.counters.skipped[reason] += 1
            await message.ack()
            return
        try:
            planned = await self.plan(alert, seq, appended, raw.data, message)
        except Exception as exc:  # NATS trouble: plan it again (the jobs' ids dedupe)
            log.warning("alert seq %s not planned (%s); again in 1 s", seq, exc)
            await message.nack(delay=1.0)
            return
        log.info("alert %s seq %s: %d push(es) planned", alert.alert_id, seq, planned)
        await message.ack()

    async def plan(
        self, alert: Alert, seq: int, appended: float, data: bytes, message: Any = None
    ) -> int:
        assert self.view is not None
        jobs: list[str] = []
        for consumer, (_, reg) in list(self.view.registrations.items()):
            record = self.view.records.get(consumer)
            subscription = record.subscription if record is not None else Subscription()
            if subscription.matches(alert, reg.regions):
                jobs.append(consumer)
            else:
                self.counters.skipped["not_subscribed"] += 1
        head = orjson.dumps({"seq": seq, "appended": appended})[:-1]
        for i in range(0, len(jobs), PLAN_CHUNK):
            await asyncio.gather(
                *(
                    self.js.publish(
                        self.names.push_job_subject(consumer, seq),
                        head
                        + b',"consumer":'
                        + orjson.dumps(consumer)
                        + b',"alert":'
                        + data
                        + b"}",
                        headers={MSG_ID_HEADER: f"{consumer}.{seq}"},
                        timeout=5.0,
                    )
                    for consumer in jobs[i : i + PLAN_CHUNK]
                )
            )
            if message is not None:  # a long fan-out must not be handed to another planner
                await message.in_progress()
        self.counters.planned += len(jobs)
        return len(jobs)

    # ------------------------------------------------------------ 2. the pusher
    async def on_job(self, message: NatsMessage) -> None:
        raw = message.raw_message
        job = orjson.loads(raw.data)
        consumer, seq = str(job["consumer"]), int(job["seq"])
        with log_context(consumer=consumer, seq=seq):
            try:
                await self._job(message, job, consumer, seq)
            # NATS trouble: look again soon. After "sending" was written the push is in
            # doubt on the next look, and never requested again.
            except Exception as exc:
                log.warning("push job %s/%s: %s; again in %.0f s", consumer, seq, exc, 2.0)
                await message.nack(delay=2.0)

    async def _job(
        self, message: NatsMessage, job: dict[str, Any], consumer: str, seq: int
    ) -> None:
        assert self.view is not None
        await self.view.caught_up.wait()
        alert = Alert.model_validate(job["alert"])
        reason = pushable(alert, seq, self.supersessions)
        if reason is not None:
            return await self._skip(message, reason)
        registered = self.view.registration(consumer)
        if registered is None:
            return await self._skip(message, "unregistered")
        reg_seq, reg = registered
        record = self.view.records.get(consumer)
        floor = (record.floor or 0) if record is not None else 0
        if floor < seq and not _exact(record):
            floor = max(floor, await self._queue_floor(consumer))
        if floor < seq and record is not None and record.owner and record.gateway:
            # Owned: a live device's queue hears of its acks only every
            # TOCSIN_QUEUE_SAVE_SECONDS; its gateway's positions journal holds them meanwhile
            # (gateway/journal.py), and still does after that gateway was killed.
            journaled = await self.journal.read(record.gateway, consumer)
            if journaled is not None:
                floor = max(floor, journaled.floor)
        if floor >= seq:
            return await self._skip(message, "received")
        if record is not None and record.owner and await self._gateway_alive(record.gateway):
            self.counters.deferred += 1  # connected: the socket delivers it, or it leaves
            await message.nack(delay=self.recheck_seconds)
            return
        entry = await self.ledger.begin(consumer, seq)
        if entry.state in FINAL:
            return await self._skip(message, "already_sent")
        if entry.state == "sending":  # a notifier stopped mid-request: maybe sent; not again
            await self._dead(message, job, entry.seq, entry.attempt, "in_doubt", "in_doubt", "")
            return
        attempt = entry.attempt
        outcome = await self.sender.send(fcm.message(alert, seq, reg.token or ""))
        if outcome.kind == "sent":
            await self.ledger.note(consumer, seq, "sent", attempt, entry.seq)
            self.counters.pushed(time.time() - float(job["appended"]))
            await message.ack()
            return
        self.counters.failed[outcome.reason] += 1
        if outcome.kind == "unregistered":
            await self.ledger.write(consumer, seq, "dropped", attempt, entry.seq)
            if await self.registrations.remove(reg.user, reg.client_id, expected=reg_seq):
                self.counters.dropped += 1
                log.info("%s: FCM no longer knows its token; registration dropped", consumer)
            await message.ack()
            return
        if outcome.kind == "rejected":
            await self._dead(
                message, job, entry.seq, attempt, "rejected", outcome.reason, outcome.detail
            )
            return
        # retry: 429, 5xx, timeouts, connection errors, 401 (with a new token)
        if outcome.reason == "http_401" and self.bearer is not None:
            await self.bearer.header(force=True)
        if attempt >= self.settings.push_max_attempts:
            await self._dead(
                message, job, entry.seq, attempt, "exhausted", outcome.reason, outcome.detail
            )
            return
        await self.ledger.write(consumer, seq, "failed", attempt, entry.seq)
        delay = retry_delay(attempt, self.settings.push_backoff_seconds, outcome.retry_after)
        self.counters.retried += 1
        log.info(
            "push %s/%s attempt %d failed (%s); again in %.1f s",
            consumer,
            seq,
            attempt,
            outcome.reason,
            delay,
        )
        await message.nack(delay=delay)

    async def _skip(self, message: NatsMessage, reason: str) -> None:
        self.counters.skipped[reason] += 1
        await message.ack()

    async def _dead(
        self,
        message: NatsMessage,
        job: dict[str, Any],
        ledger_seq: int,
        attempt: int,
        kind: str,
        reason: str,
        detail: str,
    ) -> None:
        """Keep the push in ``PUSH_DLQ`` (``tocsin.push.dlq.<kind>``), mark it dead, ack."""
        consumer, seq = str(job["consumer"]), int(job["seq"])
        await self.js.publish(
            self.names.push_dlq_subject(kind),
            orjson.dumps({**job, "attempts": attempt, "reason": reason, "detail": detail}),
            headers={
                REASON_HEADER: reason,
                DETAIL_HEADER: detail[:200].replace("\r", " ").replace("\n", " "),
                MSG_ID_HEADER: f"{consumer}.{seq}",
            },
            timeout=5.0,
        )
        try:
            await self.ledger.write(consumer, seq, "dead", attempt, ledger_seq)
        except Exception as exc:  # the DLQ entry is what counts; a repeat is deduped
            log.warning("push %s/%s: ledger not marked dead: %s", consumer, seq, exc)
        self.counters.dead_lettered[kind] += 1
        log.warning("push %s/%s dead-lettered (%s: %s)", consumer, seq, kind, reason)
        await message.ack()

    async def _queue_floor(self, consumer: str) -> int:
        """The device queue's ack floor (0: no queue): what the device acked, or was written
        in ``auto`` mode, as far as the gateway has told JetStream."""
        try:
            info = await self.js.consumer_info(self.names.alerts_stream, consumer)
        except NotFoundError:
            return 0
        return int(info.ack_floor.stream_seq) if info.ack_floor else 0

    async def _gateway_alive(self, instance: str | None) -> bool:
        """The gateway's lease in ``GUARD`` is current (gateway/guard.py): its sessions are."""
        if not instance:
            return False
        bucket = self.names.guard_bucket
        try:
            msg = await self.js.get_last_msg(f"KV_{bucket}", f"$KV.{bucket}.gw.{instance}")
        except NotFoundError:
            return False
        headers = msg.headers or {}
        return not (headers.get("KV-Operation") or headers.get("Nats-Marker-Reason"))


def create_app(settings: Settings, nats_urls: list[str]) -> FastStream:
    if not settings.push_url:
        raise ValueError("TOCSIN_PUSH_URL is required for the notifier")
    counters = NotifierCounters()
    names = Names(settings.namespace)
    logger = _faststream_logger()
    broker = NatsBroker(
        nats_urls,
        logger=logger,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,  # type: ignore[arg-type]  # seconds; see ingest/app.py
        # SIGTERM lets requests in flight get their answer (else they are in doubt)
        graceful_timeout=settings.push_timeout_seconds + 5,
        **connect_options(settings),
    )
    notifier = Notifier(settings, counters)
    ack_wait = settings.push_timeout_seconds * 2 + PUSH_ACK_WAIT_MARGIN

    planner = broker.subscriber(
        names.alerts_all,
        stream=JStream(names.alerts_stream, declare=False),
        durable=names.notifier_consumer,
        pull_sub=PullSub(batch_size=16, timeout=1.0),
        config=ConsumerConfig(
            ack_policy=JsAckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=ack_wait,
            max_ack_pending=10_000,  # alerts waiting for their push to be due
            max_deliver=-1,
            description="tocsin notifier: plans push notifications",
        ),
        ack_policy=AckPolicy.MANUAL,
        title="alerts (push planner)",
        description="Every alert, looked at once when its push is due",
    )
    _fetch_timeouts_as_documented(planner)

    # No parameters: the message comes from faststream's context. A ``message: NatsMessage``
    # parameter is a fast_depends custom field whose (sync) resolver runs in a worker thread
    # (anyio.to_thread), a thread hop per message (measured: docs/benchmarks.md, "Push").
    def current() -> NatsMessage:
        message: NatsMessage = broker.context.get_local("message")
        return message

    @planner
    async def on_alert() -> None:
        await notifier.on_alert(current())

    pusher = broker.subscriber(
        names.push_jobs_all,
        stream=JStream(names.push_stream, declare=False),
        durable=names.push_consumer,
        pull_sub=PullSub(batch_size=settings.push_concurrency, timeout=1.0),
        max_workers=settings.push_concurrency,
        config=ConsumerConfig(
            ack_policy=JsAckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=100_000,  # deferred and retried jobs wait here
            max_deliver=-1,  # attempts are counted in the ledger (deferrals are not attempts)
            description="tocsin notifier: sends push notifications",
        ),
        ack_policy=AckPolicy.MANUAL,
        title="push jobs",
        description="One job per (device, alert) push",
    )
    assert isinstance(pusher, PullStreamSubscriber)  # the concurrent one is one
    _fetch_timeouts_as_documented(pusher)

    @pusher
    async def on_job() -> None:
        await notifier.on_job(current())

    app = FastStream(broker, logger=logger)
    runners: list[web.AppRunner] = []

    @app.on_startup
    async def _start() -> None:
        await broker.connect()
        connection = broker.connection
        counters.connected = lambda: connection.is_connected
        js = connection.jetstream()
        await apply_topology(js, settings, names)
        await notifier.start(js, connection)
        runner = await serve(
            metrics_app(counters),
            settings.http_host,
            settings.notifier_metrics_port,
            "notifier",
            "TOCSIN_NOTIFIER_METRICS_PORT",
        )
        if runner is not None:
            runners.append(runner)

    @app.after_shutdown
    async def _stop() -> None:
        await notifier.stop()
        for runner in runners:
            await runner.cleanup()

    app_notifiers[app] = notifier
    return app


#: The notifier of each app (tests read its counters).
app_notifiers: WeakKeyDictionary[FastStream, Notifier] = WeakKeyDictionary()
