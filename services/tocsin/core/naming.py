"""Every stream, subject and consumer name of tocsin is built here and nowhere else.

Subjects of ``ALERTS`` read left to right from the most to the least selective part, so
that an operator can read ``nats stream view ALERTS`` and consumers filter on the server:

    alerts.<country>.<region>.<level>.<alert_type>
    alerts.KE.KE-30.high.outbreak_risk      an alert for Homa Bay county, Kenya
    alerts.KE.KE.emergency.outbreak_risk    a country-wide alert (region = country)

A token region ``KE`` becomes the filter ``alerts.KE.>``; ``UG-102`` becomes
``alerts.UG.UG-102.>``. Region containment is by whole code, never by string prefix.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tocsin.schemas.alert import is_region, region_contains

# --- headers and metadata keys (every one tocsin writes or reads) ---------------------
#: JetStream's idempotency key: the alert id (``ALERTS`` drops a repeat in its window).
MSG_ID_HEADER = "Nats-Msg-Id"
#: The token of ``DEVICES`` subjects that hold gateways' positions journals, not a device
#: (no consumer name starts with ``_``).
POSITIONS = "_positions"
#: JetStream's per-message TTL, whole seconds (the stream allows message TTLs).
TTL_HEADER = "Nats-TTL"
#: A write conditional on the sequence of the subject's last message (device records).
EXPECTED_LAST_HEADER = "Nats-Expected-Last-Subject-Sequence"
#: When an alert expires, unix seconds: the gateway checks it without parsing the JSON.
EXPIRES_HEADER = "Tocsin-Expires"
#: Why the ingest service dead-lettered an event, and the validation errors (JSON).
REASON_HEADER = "Tocsin-Reason"
ERRORS_HEADER = "Tocsin-Errors"
#: The CAP details of an alert that came as CAP (tocsin.cap.mapping.CapMeta, JSON).
CAP_HEADER = "Tocsin-Cap"
#: Consumer metadata: the device's subscription (groups and filters) as compact JSON.
SUBSCRIPTION_KEY = "tocsin.subscription"
#: Consumer metadata of versions before device records: the highest seq sent (read only).
SENT_KEY = "tocsin.sent"
#: Consumer metadata naming a device queue's device (also when its name is a digest).
USER_KEY = "tocsin.user"
CLIENT_ID_KEY = "tocsin.client_id"

_SAFE = re.compile(r"[A-Za-z0-9@+\-]")
#: NATS refuses longer consumer names (error 10102).
MAX_CONSUMER_NAME = 255


def _escape(text: str) -> str:
    """Make ``text`` safe inside a consumer name, reversibly: unsafe bytes become ``_hh``.

    The result never contains ``__`` and never ends in ``_``, so ``__`` can separate parts.
    """
    out = []
    for ch in text:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def _unescape(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "_":
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(text[i].encode())
            i += 1
    return raw.decode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Names:
    """Names for one deployment; ``namespace`` prefixes all of them (empty in production)."""

    namespace: str = ""

    # --- streams ---------------------------------------------------------------------
    @property
    def _stream_prefix(self) -> str:
        return f"{self.namespace.upper()}_" if self.namespace else ""

    @property
    def _subject_prefix(self) -> str:
        return f"{self.namespace}." if self.namespace else ""

    @property
    def ingest_stream(self) -> str:
        return f"{self._stream_prefix}INGEST"

    @property
    def alerts_stream(self) -> str:
        return f"{self._stream_prefix}ALERTS"

    @property
    def dlq_stream(self) -> str:
        return f"{self._stream_prefix}INGEST_DLQ"

    @property
    def devices_stream(self) -> str:
        """One record per device (position, subscription): rebuilds a queue whose node died."""
        return f"{self._stream_prefix}DEVICES"

    @property
    def guard_bucket(self) -> str:
        """The KV bucket of bans, connection slots and gateway leases (gateway/guard.py)."""
        return f"{self._stream_prefix}GUARD"

    @property
    def index_stream(self) -> str:
        """Alerts by id: where each is in ``ALERTS``, which are superseded, which are held
        (core/alert_index.py)."""
        return f"{self._stream_prefix}ALERT_INDEX"

    @property
    def push_stream(self) -> str:
        """Push jobs, one per (device, alert) due for a push (a work queue: notifier/)."""
        return f"{self._stream_prefix}PUSH"

    @property
    def push_ledger_stream(self) -> str:
        """One entry per (device, alert) push: attempted, failed, sent (notifier/ledger.py)."""
        return f"{self._stream_prefix}PUSH_LEDGER"

    @property
    def push_dlq_stream(self) -> str:
        """Pushes that failed for good, with the reason."""
        return f"{self._stream_prefix}PUSH_DLQ"

    @property
    def streams(self) -> tuple[str, ...]:
        """Every stream tocsin declares (core/topology.py), in declaration order."""
        return (
            self.ingest_stream,
            self.alerts_stream,
            self.devices_stream,
            self.dlq_stream,
            self.index_stream,
            self.push_stream,
            self.push_ledger_stream,
            self.push_dlq_stream,
        )

    # --- subjects --------------------------------------------------------------------
    @property
    def ingest_subject(self) -> str:
        """Where the engine publishes raw alert JSON (CONTRACT §5)."""
        return f"{self._subject_prefix}ingest.alerts"

    @property
    def alerts_all(self) -> str:
        return f"{self._subject_prefix}alerts.>"

    @property
    def dlq_all(self) -> str:
        return f"{self._subject_prefix}ingest.dlq.>"

    def dlq_subject(self, reason: str) -> str:
        """``ingest.dlq.<reason>``: reason is one of :class:`tocsin.ingest.pipeline.Rejection`."""
        return f"{self._subject_prefix}ingest.dlq.{reason}"

    def alert_subject(self, region: str, level: str, alert_type: str) -> str:
        if not is_region(region):
            raise ValueError(f"not a region code: {region!r}")
        return f"{self._subject_prefix}alerts.{region[:2]}.{region}.{level}.{alert_type}"

    def region_filters(self, regions: Iterable[str] | None) -> list[str]:
        """Server-side filter subjects for a set of region prefixes (None = everything).

        Contained prefixes collapse (``KE`` swallows ``KE-30``) because JetStream rejects
        overlapping filters on one consumer.
        """
        if regions is None:
            return [self.alerts_all]
        unique = sorted(set(regions))
        for region in unique:
            if not is_region(region):
                raise ValueError(f"not a region code: {region!r}")
        kept = [r for r in unique if not any(o != r and region_contains(o, r) for o in unique)]
        filters = []
        for region in kept:
            tail = ">" if len(region) == 2 else f"{region}.>"
            filters.append(f"{self._subject_prefix}alerts.{region[:2]}.{tail}")
        return filters

    def alert_filter(self, region: str | None, level: str | None, alert_type: str | None) -> str:
        """The filter for alerts within ``region`` of ``level`` and ``alert_type`` (None: any),
        spelled as an operator would: ``alerts.KE.>``, ``alerts.*.*.emergency.*``."""
        if region is not None and not is_region(region):
            raise ValueError(f"not a region code: {region!r}")
        parts = ["*", "*"] if region is None else [region[:2], "*" if len(region) == 2 else region]
        parts += [level or "*", alert_type or "*"]
        while parts and parts[-1] == "*":  # trailing wildcards read better as one ">"
            parts.pop()
        spelled = ".".join(parts) if len(parts) == 4 else ".".join([*parts, ">"])
        return f"{self._subject_prefix}alerts.{spelled}"

    @property
    def no_alerts(self) -> str:
        """A filter no alert subject matches (alert subjects have five tokens): for a
        subscription that can match nothing, since a consumer without filters gets all."""
        return f"{self._subject_prefix}alerts.NONE"

    def parse_alert_subject(self, subject: str) -> tuple[str, str, str]:
        """(region, level, alert_type) of an ``ALERTS`` subject."""
        parts = subject[len(self._subject_prefix) :].split(".")
        return parts[2], parts[3], parts[4]

    @property
    def index_all(self) -> str:
        return f"{self._subject_prefix}tocsin.index.>"

    def index_subject(self, kind: str, alert_id: str) -> str:
        """``tocsin.index.<kind>.<alert_id>``: kind ``at`` (its seq in ``ALERTS``),
        ``superseded`` (by a later update or cancel) or ``held`` (a CAP message whose status
        is not Actual). The id is escaped into one subject token (``.`` is allowed in ids)."""
        return f"{self._subject_prefix}tocsin.index.{kind}.{_escape(alert_id)}"

    def parse_index_subject(self, subject: str) -> tuple[str, str]:
        """(kind, alert_id) of an ``ALERT_INDEX`` subject."""
        parts = subject[len(self._subject_prefix) :].split(".")
        return parts[2], _unescape(parts[3])

    def index_kind_all(self, kind: str) -> str:
        return f"{self._subject_prefix}tocsin.index.{kind}.*"

    # --- consumers -------------------------------------------------------------------
    ingest_consumer: str = "ingest"

    def device_consumer(self, user_id: str, client_id: str) -> str:
        """The durable consumer that is one device's offline queue: ``dev__<user>__<client>``.

        Names over NATS's limit (255) become ``devh__<digest>``; the consumer's metadata
        (``tocsin.user``, ``tocsin.client_id``) still names the device for operators.
        """
        name = f"dev__{_escape(user_id)}__{_escape(client_id)}"
        if len(name) <= MAX_CONSUMER_NAME:
            return name
        key = f"{user_id}\x00{client_id}".encode("utf-8", "surrogatepass")
        return f"devh__{hashlib.sha256(key).hexdigest()}"

    @staticmethod
    def parse_device_consumer(name: str) -> tuple[str, str] | None:
        parts = name.split("__")
        if len(parts) != 3 or parts[0] != "dev":
            return None
        return _unescape(parts[1]), _unescape(parts[2])

    @classmethod
    def device_of(cls, name: str, metadata: dict[str, str] | None) -> tuple[str, str] | None:
        """(user, client_id) of a device queue, from its name or, for a name that is a
        digest (``devh__``), from its metadata; None for any other consumer."""
        parsed = cls.parse_device_consumer(name)
        if parsed is not None:
            return parsed
        user, client = (metadata or {}).get(USER_KEY), (metadata or {}).get(CLIENT_ID_KEY)
        if name.startswith("devh__") and isinstance(user, str) and isinstance(client, str):
            return user, client
        return None

    @staticmethod
    def consumer_reset_api(stream: str, consumer: str) -> str:
        """JetStream's consumer reset API (nats-server 2.14+; nats-py has no call for it)."""
        return f"$JS.API.CONSUMER.RESET.{stream}.{consumer}"

    @property
    def devices_all(self) -> str:
        return f"{self._subject_prefix}tocsin.devices.>"

    def device_record_subject(self, consumer: str) -> str:
        """The subject of a device's record in ``DEVICES`` (the last message per subject)."""
        return f"{self._subject_prefix}tocsin.devices.{consumer}"

    def device_push_subject(self, consumer: str) -> str:
        """A device's push registration in ``DEVICES``, beside its record (gateway/push.py)."""
        return f"{self._subject_prefix}tocsin.devices.{consumer}.push"

    @property
    def device_push_all(self) -> str:
        return f"{self._subject_prefix}tocsin.devices.*.push"

    @staticmethod
    def is_push_subject(subject: str) -> bool:
        """A registration, not a record (consumer names hold no dot)."""
        return subject.endswith(".push")

    def consumer_of_devices_subject(self, subject: str) -> str:
        """The device consumer a ``DEVICES`` subject (record or registration) belongs to."""
        return subject[len(self._subject_prefix) :].split(".")[2]

    @property
    def push_jobs_all(self) -> str:
        return f"{self._subject_prefix}tocsin.push.jobs.>"

    def push_job_subject(self, consumer: str, seq: int) -> str:
        return f"{self._subject_prefix}tocsin.push.jobs.{consumer}.{seq}"

    @property
    def push_ledger_all(self) -> str:
        return f"{self._subject_prefix}tocsin.push.ledger.>"

    def push_ledger_subject(self, consumer: str, seq: int) -> str:
        return f"{self._subject_prefix}tocsin.push.ledger.{consumer}.{seq}"

    @property
    def push_dlq_all(self) -> str:
        return f"{self._subject_prefix}tocsin.push.dlq.>"

    def push_dlq_subject(self, reason: str) -> str:
        return f"{self._subject_prefix}tocsin.push.dlq.{reason}"

    #: The notifier's durable on ``ALERTS`` (every alert, judged once), and on ``PUSH``.
    notifier_consumer: str = "notifier"
    push_consumer: str = "notifier-push"

    def positions_subject(self, instance: str, shard: int) -> str:
        """A shard of gateway ``instance``'s positions journal in ``DEVICES`` (the acked
        floors of its live devices, gateway/journal.py). ``_positions`` is no consumer name."""
        return f"{self._subject_prefix}tocsin.devices.{POSITIONS}.{instance}.{shard}"

    # --- core NATS control subjects -------------------------------------------------
    def legacy_takeover_subject(self, consumer: str) -> str:
        """Where a session of a version before device ownership listens for a newer
        connection of its device (asked during a rolling upgrade only)."""
        return f"{self._subject_prefix}tocsin.device.{consumer}.takeover"

    def gateway_takeover_subject(self, instance: str) -> str:
        """A gateway listens here; a newer connection of a device one of its sessions owns
        asks it to let the device go (gateway/ownership.py)."""
        return f"{self._subject_prefix}tocsin.gateway.{instance}.takeover"

    @property
    def gateways_stats_subject(self) -> str:
        """Every gateway answers a request here with its stats (the body of
        ``GET /api/v1/alerts/stats``); ``tocsin status`` gathers the answers."""
        return f"{self._subject_prefix}tocsin.gateways.stats"


def matches(subject: str, pattern: str) -> bool:
    """NATS subject matching (``*`` one token, ``>`` one or more trailing tokens)."""
    s = subject.split(".")
    p = pattern.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(s) == len(p)
