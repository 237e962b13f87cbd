"""The alert: the one object that travels from the engine to every device (CONTRACT §4)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: ISO 3166-1 alpha-2 (``KE``) or ISO 3166-2 (``KE-30``). Hierarchy is by whole code
#: segments, never by string prefix: ``KE`` contains ``KE-30``; ``KE-3`` does not.
REGION_PATTERN = r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$"
_REGION_RE = re.compile(REGION_PATTERN)
#: Alert ids travel as ``Nats-Msg-Id`` and in subjects of later features: keep them plain.
ALERT_ID_STR_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
#: The largest integer alert_id: 2^53 - 1, exact in JavaScript and Dart (CONTRACT §4).
MAX_ALERT_ID = 2**53 - 1


class AlertLevel(StrEnum):
    """Ordered: each level includes the ones above it in ``level:`` groups."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _LEVEL_RANK[self]


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    URGENT = "urgent"
    EMERGENCY = "emergency"

    @property
    def rank(self) -> int:
        return _PRIORITY_RANK[self]


class MsgType(StrEnum):
    """What an alert does to the ones its ``references`` name (CAP's ``msgType``)."""

    ALERT = "alert"  # a new alert; references nothing
    UPDATE = "update"  # replaces the referenced alerts
    CANCEL = "cancel"  # withdraws the referenced alerts


_LEVEL_RANK = {level: i for i, level in enumerate(AlertLevel)}
_PRIORITY_RANK = {p: i for i, p in enumerate(Priority)}

#: The built-in alert types; ``TOCSIN_ALERT_TYPES`` may add more (checked at ingest).
DEFAULT_ALERT_TYPES: tuple[str, ...] = ("outbreak_risk", "system_health", "data_quality")
ALERT_TYPE_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must carry a time zone, e.g. 2026-11-25T10:00:00Z")
    return value.astimezone(UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


def is_region(code: str) -> bool:
    return _REGION_RE.fullmatch(code) is not None


def region_contains(prefix: str, region: str) -> bool:
    """True when ``region`` lies within ``prefix`` (``KE`` ⊇ ``KE-30``, ``KE-30`` ⊇ ``KE-30``)."""
    return region == prefix or region.startswith(prefix + "-")


class Location(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    region: str = Field(pattern=REGION_PATTERN, examples=["KE-30"])
    lat: float | None = Field(default=None, ge=-90, le=90, strict=True)
    lon: float | None = Field(default=None, ge=-180, le=180, strict=True)

    @model_validator(mode="after")
    def _point_is_whole(self) -> Location:
        if (self.lat is None) != (self.lon is None):
            raise ValueError("lat and lon come together or not at all")
        return self


AlertId = (
    Annotated[int, Field(ge=1, le=MAX_ALERT_ID, strict=True)]
    | Annotated[str, Field(pattern=ALERT_ID_STR_PATTERN)]
)
#: An update or cancel names at most this many alerts.
MAX_REFERENCES = 100


class Alert(BaseModel):
    """An alert as published by the engine and as delivered to devices."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alert_id: AlertId
    alert_level: AlertLevel
    alert_type: str = Field(pattern=ALERT_TYPE_PATTERN)
    title: str = Field(min_length=1, max_length=200)
    message: str = Field(min_length=1, max_length=8000)
    priority: Priority = Priority.NORMAL
    location: Location
    # strict: a JSON number / integer / boolean, not "0.8", true, 5.0 or "true" (CONTRACT §4)
    risk_score: float | None = Field(default=None, ge=0, le=1, strict=True)
    confidence_score: float | None = Field(default=None, ge=0, le=1, strict=True)
    affected_population: int | None = Field(default=None, ge=0, strict=True)
    action_required: bool = Field(default=False, strict=True)
    action_url: str | None = Field(default=None, max_length=2000, pattern=r"^https?://\S+$")
    created_at: UtcDatetime | None = None
    expiry_time: UtcDatetime | None = None
    #: Left out of the stored JSON when they are the defaults (a plain alert), so alerts
    #: without them are stored and delivered byte for byte as before.
    msg_type: MsgType = Field(default=MsgType.ALERT, exclude_if=lambda v: v is MsgType.ALERT)
    references: tuple[AlertId, ...] = Field(
        default=(),
        max_length=MAX_REFERENCES,
        exclude_if=lambda v: not v,
        validate_default=True,
    )

    @field_validator("references")
    @classmethod
    def _references_fit_msg_type(
        cls, value: tuple[int | str, ...], info: ValidationInfo
    ) -> tuple[int | str, ...]:
        msg_type = info.data.get("msg_type", MsgType.ALERT)
        if msg_type is MsgType.ALERT:
            if value:
                raise ValueError("only an update or a cancel references alerts")
        elif not value:
            raise ValueError(f"a {msg_type.value} names the alerts it replaces")
        if "alert_id" in info.data and str(info.data["alert_id"]) in {str(r) for r in value}:
            raise ValueError("an alert cannot supersede itself")
        return value

    @property
    def referenced_ids(self) -> tuple[str, ...]:
        """``references`` as idempotency keys (an integer and its decimal string are one)."""
        return tuple(dict.fromkeys(str(r) for r in self.references))

    @property
    def supersedes(self) -> bool:
        return self.msg_type is not MsgType.ALERT

    @property
    def msg_id(self) -> str:
        """The idempotency key as JetStream sees it (``Nats-Msg-Id``)."""
        return str(self.alert_id)

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expiry_time is not None and self.expiry_time <= (
            datetime.now(UTC) if now is None else now
        )
