"""The ingest service: a faststream app draining ``INGEST`` into ``ALERTS`` or ``INGEST_DLQ``.

The engine's events are captured by JetStream before validation (``INGEST`` is a work
queue), so nothing is lost while this service is down. A message is acked only after its
alert (or its dead letter) is stored; a NATS failure nacks it for a retry.

Logging: faststream logs through :data:`FASTSTREAM_LOGGER` (a tocsin logger, so its lines
take the process's format, tocsin.core.logs), and each event's records carry
``ingest_seq`` (its sequence in ``INGEST``) and, once validated, ``alert_id``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any
from weakref import WeakKeyDictionary

from aiohttp import web
from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from faststream.nats.subscriber.usecases.stream_pull_subscriber import PullStreamSubscriber
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from tocsin.cap import CapRules
from tocsin.core.logs import bind, log_context
from tocsin.core.naming import Names
from tocsin.core.natsauth import connect_options
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from .metrics import IngestCounters, serve_metrics
from .pipeline import Rejection, dead_letter, store_alert, validate_any

log = logging.getLogger(__name__)


#: Seconds before an unacked event is handed out again (chaos suite: 30 s stalled alerts
#: after an ingest kill -9).
INGEST_ACK_WAIT = 5.0
#: Events fetched per pull request, and how long one request waits on an idle stream.
PULL_BATCH = 64
PULL_TIMEOUT = 1.0
#: faststream's own lines (the app's start and stop, the subscriber's) go to this logger
#: rather than to the coloured handlers faststream makes for itself (the broker's on stdout).
FASTSTREAM_LOGGER = "tocsin.ingest.faststream"


# --- pull requests that expire empty ----------------------------------------------------
# An idle ``fetch(64, timeout=1)`` of nats-py 2.15+ ends in one of two ways, at random: the
# client's timer fires first (nats.errors.TimeoutError), or the server's 408 for the
# request (it expires 100 us before the timer) arrives first, after which ``_fetch_n``
# finds its deadline used up and raises a *bare* ``asyncio.TimeoutError`` (nats/js/
# client.py:1295 and :1302, from nats-io/nats.py#934; nats-io/nats.py#1008 would fix it).
# faststream's consume loop only suppresses nats.errors.TimeoutError (faststream/nats/
# subscriber/usecases/stream_pull_subscriber.py:83), so the bare one ends the consume
# task: faststream logs an ERROR with the traceback ("Task-N raised an exception,
# retrying...", _internal/endpoint/subscriber/supervisor.py:122-134) and starts the loop
# again (a finished task more in its list each time). Measured on loopback: about one
# idle fetch in 30. Both outcomes mean the same, "no event within the timeout": the
# subscription's fetch gives the documented nats.errors.TimeoutError for both.
Fetch = Callable[[int, float | None, float | None], Coroutine[Any, Any, list[Msg]]]


def _expired_as_nats_timeout(fetch: Fetch) -> Fetch:
    async def fetch_expiring_as_documented(
        batch: int = 1, timeout: float | None = 5, heartbeat: float | None = None
    ) -> list[Msg]:
        try:
            return await fetch(batch, timeout, heartbeat)
        except NatsTimeoutError:
            raise
        except TimeoutError as exc:  # the bare one: the pull request expired empty
            raise NatsTimeoutError from exc

    fetch_expiring_as_documented.tocsin_expiry = True  # type: ignore[attr-defined]
    return fetch_expiring_as_documented


def _fetch_timeouts_as_documented(subscriber: PullStreamSubscriber) -> None:
    """Wrap the pull subscription's ``fetch`` as soon as faststream creates it, before its
    consume task (created then, not yet run) makes the first request."""
    if not callable(getattr(type(subscriber), "_create_subscription", None)):
        raise RuntimeError("faststream's pull subscriber changed: see _expired_as_nats_timeout")
    create = subscriber._create_subscription

    async def create_subscription() -> None:
        await create()
        sub = subscriber.subscription
        if sub is not None and not getattr(sub.fetch, "tocsin_expiry", False):
            # An instance attribute: this subscription only.
            sub.fetch = _expired_as_nats_timeout(sub.fetch)  # type: ignore[method-assign,assignment]

    subscriber._create_subscription = create_subscription  # type: ignore[method-assign]


# faststream logs this at INFO from the done-callback of every consume task it supervises,
# before it looks at how the task ended (supervisor.py:104-107): once at every stop (the
# task is cancelled) and before each restart, where the ERROR above says what happened.
# It never carries information of its own.
_TASK_DONE = re.compile(r"callback for \S+ is being executed\.\.\.")


class _NoTaskDoneLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and _TASK_DONE.fullmatch(record.msg))


def _faststream_logger() -> logging.Logger:
    logger = logging.getLogger(FASTSTREAM_LOGGER)
    if not any(isinstance(f, _NoTaskDoneLines) for f in logger.filters):
        logger.addFilter(_NoTaskDoneLines())
    return logger


def retry_delay(attempt: int) -> float:
    """Seconds before redelivering an event that could not be stored: 0.5 s doubling to 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, attempt - 1)))


def create_app(settings: Settings, nats_urls: list[str]) -> FastStream:
    counters = IngestCounters()
    names = Names(settings.namespace)
    logger = _faststream_logger()
    broker = NatsBroker(
        nats_urls,
        logger=logger,
        max_reconnect_attempts=-1,
        # Seconds, fractions included: nats-py sleeps on it. faststream and nats-py annotate
        # it int, wrongly (nats-io/nats.py#1000); 0.5 matches the gateway's connection.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
        **connect_options(settings),  # a .creds file, its own inbox prefix
    )
    accepted = settings.accepted_alert_types
    cap_rules = CapRules.from_settings(settings)
    state: dict[str, JetStreamContext] = {}

    subscriber = broker.subscriber(
        names.ingest_subject,
        stream=JStream(names.ingest_stream, declare=False),
        durable=names.ingest_consumer,
        pull_sub=PullSub(batch_size=PULL_BATCH, timeout=PULL_TIMEOUT),
        config=ConsumerConfig(
            ack_policy=JsAckPolicy.EXPLICIT,
            # An event fetched by an ingest process that then died waits this long before
            # another process gets it (a batch of up to 64 is fetched ahead): keep it short.
            # Storing one event takes milliseconds; a slower attempt that overruns it is
            # repeated, and ALERTS drops the repeat by Nats-Msg-Id.
            ack_wait=INGEST_ACK_WAIT,
            max_ack_pending=1024,
            description="tocsin ingest: validates engine events into ALERTS",
        ),
        ack_policy=AckPolicy.MANUAL,
        title="ingest.alerts",
        description="Raw alert JSON (CONTRACT §4) or CAP 1.2 XML from the engine; invalid events "
        "go to the DLQ",
    )
    _fetch_timeouts_as_documented(subscriber)

    @subscriber
    async def on_event(message: NatsMessage) -> None:
        # The raw bytes, not faststream's decoded body: a bad event must reach the DLQ as sent.
        raw = message.raw_message.data
        metadata = message.raw_message.metadata
        with log_context(ingest_seq=metadata.sequence.stream):
            try:
                await _process(raw, message.raw_message.headers)
            except Exception as exc:  # NATS trouble: keep the event, retry with backoff
                counters.store_failures += 1
                attempt = metadata.num_delivered
                delay = retry_delay(attempt)
                log.warning(
                    "event not stored (attempt %d, retry in %.1fs): %s", attempt, delay, exc
                )
                await message.nack(delay=delay)
                return
            await message.ack()

    async def _process(raw: bytes, headers: dict[str, str] | None) -> None:
        js = state["js"]
        result = validate_any(raw, accepted, cap_rules)  # alert JSON or CAP XML
        if isinstance(result, Rejection):
            ack = await dead_letter(js, names, raw, result, headers)
            counters.refused(result.reason.value)
            log.warning("rejected event -> DLQ seq %s: %s", ack.seq, result.detail)
            return
        bind(alert_id=result.alert_id)  # on_event's log_context undoes it
        ack = await store_alert(js, names, result)
        counters.stored(bool(ack.duplicate))
        log.info(
            "alert %s -> %s seq %s%s",
            result.alert_id,
            ack.stream,
            ack.seq,
            " (duplicate)" if ack.duplicate else "",
        )

    app = FastStream(broker, logger=logger)

    runners: list[web.AppRunner] = []

    @app.on_startup
    async def _topology() -> None:
        await broker.connect()
        connection = broker.connection
        counters.connected = lambda: connection.is_connected
        state["js"] = connection.jetstream()
        await apply_topology(state["js"], settings, names)
        await _current_ack_wait(state["js"], names)
        runner = await serve_metrics(counters, settings.http_host, settings.ingest_metrics_port)
        if runner is not None:
            runners.append(runner)

    @app.after_shutdown
    async def _metrics_off() -> None:
        for runner in runners:
            await runner.cleanup()

    app_counters[app] = counters
    return app


#: The counters of each ingest app (tests read them; /metrics exposes them).
app_counters: WeakKeyDictionary[FastStream, IngestCounters] = WeakKeyDictionary()


async def _current_ack_wait(js: JetStreamContext, names: Names) -> None:
    """faststream never updates an existing durable: bring the ``ingest`` durable of an
    older deployment (ack_wait 30 s) to ``INGEST_ACK_WAIT`` in place, keeping its state."""
    try:
        info = await js.consumer_info(names.ingest_stream, names.ingest_consumer)
    except NotFoundError:
        return  # first start: the subscriber creates it with the current value
    config = info.config
    if config.ack_wait != INGEST_ACK_WAIT:
        config.ack_wait = INGEST_ACK_WAIT
        await js.add_consumer(names.ingest_stream, config)
        log.info("ingest durable: ack_wait now %.0f s", INGEST_ACK_WAIT)
