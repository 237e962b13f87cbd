"""The NATS topology, declared in one place and applied idempotently at start-up.

Streams are declared with nats-py, not faststream: faststream's ``JStream`` lacks
``allow_msg_ttl`` and never updates an existing definition (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError, ServiceUnavailableError

from .naming import Names
from .settings import Settings

log = logging.getLogger(__name__)

#: Dead letters are kept longer than alerts: someone has to read them.
DLQ_MAX_AGE_SECONDS = 7 * 24 * 3600
#: Largest alert JSON accepted on any path (the alert model caps its own text fields).
MAX_ALERT_BYTES = 64 * 1024
#: How long a push job's id is remembered (a re-planned alert's jobs are dropped within it;
#: past it the ledger still stops a second push).
PUSH_DUPLICATE_WINDOW_SECONDS = 3600.0


def stream_configs(settings: Settings, names: Names) -> list[StreamConfig]:
    retention = settings.retention_seconds
    window = min(settings.duplicate_window_seconds or retention, retention)
    return [
        StreamConfig(
            name=names.ingest_stream,
            description="Raw alert events from the engine, waiting for validation",
            subjects=[names.ingest_subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,
            # No max_msg_size: an oversized event must reach the ingest service and the
            # DLQ; the server's max_payload (1 MB) refuses larger ones to the publisher.
            discard=DiscardPolicy.NEW,
        ),
        StreamConfig(
            name=names.alerts_stream,
            description="Validated alerts: alerts.<country>.<region>.<level>.<type>",
            subjects=[names.alerts_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,
            duplicate_window=window,
            allow_msg_ttl=True,
            max_consumers=settings.max_devices + 64,  # + gateway feeds and tools
            max_msg_size=MAX_ALERT_BYTES * 2,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.devices_stream,
            description="One record per device: acked position, subscription; rebuilds a "
            "device queue whose node is gone",
            subjects=[names.devices_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,  # a device away longer starts at the live edge anyway
            max_msgs_per_subject=1,
            max_msg_size=MAX_ALERT_BYTES * 2,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.dlq_stream,
            description="Rejected ingest events with the reason in headers",
            subjects=[names.dlq_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=DLQ_MAX_AGE_SECONDS,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.index_stream,
            description="Alerts by id: tocsin.index.<at|superseded|held>.<alert_id>, the last "
            "message per subject (core/alert_index.py)",
            subjects=[names.index_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,  # as long as the alerts it indexes
            max_msgs_per_subject=1,
            max_msg_size=MAX_ALERT_BYTES * 8,  # a held CAP alert: its JSON and CAP details
            allow_direct=True,  # look-ups by subject from any replica
            discard=DiscardPolicy.OLD,
        ),
        # Push notifications (notifier/): one job per (device, alert) due for a push, taken
        # once by the notifier; a repeat of a job (the notifier planned an alert again after a
        # crash) is dropped by its Nats-Msg-Id within the window.
        StreamConfig(
            name=names.push_stream,
            description="Push jobs: one per (device, alert) due for a push notification",
            subjects=[names.push_jobs_all],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,
            duplicate_window=min(PUSH_DUPLICATE_WINDOW_SECONDS, retention),
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.push_ledger_stream,
            description="One entry per (device, alert) push: sending, failed or sent; written "
            "before each request, so that no push is sent twice",
            subjects=[names.push_ledger_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=retention,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.OLD,
        ),
        StreamConfig(
            name=names.push_dlq_stream,
            description="Pushes that failed for good, with the reason in headers",
            subjects=[names.push_dlq_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
            max_age=DLQ_MAX_AGE_SECONDS,
            discard=DiscardPolicy.OLD,
        ),
    ]


async def apply_topology(
    js: JetStreamContext, settings: Settings, names: Names, deadline_seconds: float = 60
) -> None:
    """Create the streams, or bring existing ones to this definition; safe to run concurrently.

    In a cluster, two starters creating the same stream at once may get no answer at all
    (measured on 2.15: one of two concurrent ``STREAM.CREATE`` requests times out while the
    other succeeds), and right after start-up the meta group may not have a leader yet. So
    each stream is retried, reading it back first, until ``deadline_seconds``.
    """
    deadline = time.monotonic() + deadline_seconds
    for config in stream_configs(settings, names):
        delay = 0.1
        while True:
            try:
                await _apply_stream(js, config)
                break
            except (TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError) as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("stream %s not applied yet (%s); retrying", config.name, exc)
                await asyncio.sleep(delay + random.random() * delay)
                delay = min(delay * 2, 2.0)


async def _apply_stream(js: JetStreamContext, config: StreamConfig) -> None:
    if config.name is None:  # every config of stream_configs is named
        raise ValueError("nats: stream name is required")
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("created stream %s", config.name)
            return
        except BadRequestError as exc:
            if exc.err_code != 10058:  # created by a concurrent starter: update below
                raise
    await js.update_stream(config)


async def topology_ready(js: JetStreamContext, names: Names) -> bool:
    for name in names.streams:
        try:
            await js.stream_info(name)
        except Exception:
            return False
    return True
