"""The ingest service: a faststream app draining ``INGEST`` into ``ALERTS`` or ``INGEST_DLQ``.

The engine's events are captured by JetStream before validation (``INGEST`` is a work
queue), so nothing is lost while this service is down. A message is acked only after its
alert (or its dead letter) is stored; a NATS failure nacks it for a retry.
"""

from __future__ import annotations

import logging

from faststream import AckPolicy, FastStream
from faststream.nats import JStream, NatsBroker, NatsMessage, PullSub
from nats.js import JetStreamContext
from nats.js.api import AckPolicy as JsAckPolicy
from nats.js.api import ConsumerConfig
from nats.js.errors import NotFoundError

from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.topology import apply_topology

from .pipeline import Rejection, append_alert, dead_letter, validate_event

log = logging.getLogger(__name__)


#: Seconds before an unacked event is handed out again (chaos suite: 30 s stalled alerts
#: after an ingest kill -9).
INGEST_ACK_WAIT = 5.0


def retry_delay(attempt: int) -> float:
    """Seconds before redelivering an event that could not be stored: 0.5 s doubling to 30 s."""
    return float(min(30.0, 0.5 * 2 ** max(0, attempt - 1)))


def create_app(settings: Settings, nats_urls: list[str]) -> FastStream:
    names = Names(settings.namespace)
    broker = NatsBroker(
        nats_urls,
        max_reconnect_attempts=-1,
        # Seconds, fractions included: nats-py sleeps on it. faststream and nats-py annotate
        # it int, wrongly (nats-io/nats.py#1000); 0.5 matches the gateway's connection.
        reconnect_time_wait=0.5,  # type: ignore[arg-type]
    )
    accepted = settings.accepted_alert_types
    state: dict[str, JetStreamContext] = {}

    @broker.subscriber(
        names.ingest_subject,
        stream=JStream(names.ingest_stream, declare=False),
        durable=names.ingest_consumer,
        pull_sub=PullSub(batch_size=64, timeout=1.0),
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
        description="Raw alert JSON from the engine (CONTRACT §4); invalid events go to the DLQ",
    )
    async def on_event(message: NatsMessage) -> None:
        # The raw bytes, not faststream's decoded body: a bad event must reach the DLQ as sent.
        raw = message.raw_message.data
        try:
            await _process(raw, message.raw_message.headers)
        except Exception as exc:  # NATS trouble: keep the event, retry with backoff
            attempt = message.raw_message.metadata.num_delivered
            delay = retry_delay(attempt)
            log.warning("event not stored (attempt %d, retry in %.1fs): %s", attempt, delay, exc)
            await message.nack(delay=delay)
            return
        await message.ack()

    async def _process(raw: bytes, headers: dict[str, str] | None) -> None:
        js = state["js"]
        result = validate_event(raw, accepted)
        if isinstance(result, Rejection):
            ack = await dead_letter(js, names, raw, result, headers)
            log.warning("rejected event -> DLQ seq %s: %s", ack.seq, result.detail)
            return
        ack = await append_alert(js, names, result)
        log.info(
            "alert %s -> %s seq %s%s",
            result.alert_id,
            ack.stream,
            ack.seq,
            " (duplicate)" if ack.duplicate else "",
        )

    app = FastStream(broker)

    @app.on_startup
    async def _topology() -> None:
        await broker.connect()
        state["js"] = broker.connection.jetstream()
        await apply_topology(state["js"], settings, names)
        await _current_ack_wait(state["js"], names)

    return app


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
