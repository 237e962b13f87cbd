"""One device: who it is, where it stands in its queue, and its record in ``DEVICES``.

* :class:`Device`: the identity a connection presents (token claims + ``client_id``) and
  what it asked for (``ack_mode``, the connect's filters). ``sub`` + ``client_id`` name the
  device's durable consumer (``Names.device_consumer``).
* :class:`Position`: where delivery stands, as a value: ``floor`` (every seq at or below it
  is settled: acked, or passed over) and ``sent`` (the highest seq any connection of the
  device was sent). The decisions on it are pure functions: where reading resumes, whether
  a frame is a repeat, whether the queue or the record must be told.
* :class:`Record`: the device's record (pydantic, like every other contract): its position,
  subscription and owner, the last message on ``tocsin.devices.<consumer>``. records.py
  reads and writes it; ownership.py decides who may.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tocsin.core.auth import Claims
from tocsin.schemas.subscription import Filters, Subscription

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    claims: Claims
    client_id: str
    ack_mode: Literal["client", "auto"]
    filters: Filters | None = None  # from the connect's query: replace the stored filters
    compression: bool = False  # the connect's query asked for permessage-deflate

    @property
    def user_id(self) -> str:
        return self.claims.sub


@dataclass(frozen=True, slots=True)
class Position:
    """Where a device stands in its queue (stream sequences of ``ALERTS``)."""

    floor: int = 0  # every seq <= floor is settled
    sent: int = 0  # the highest seq sent to the device, by any of its connections

    @property
    def next_seq(self) -> int:
        """Where reading the queue resumes."""
        return self.floor + 1

    def is_repeat(self, seq: int) -> bool:
        """A frame of ``seq`` goes out as ``redelivered``: the device was sent it before."""
        return seq <= self.sent

    def sending(self, seq: int) -> Position:
        return self if seq <= self.sent else Position(self.floor, seq)


def checkpoint_due(floor: int, saved_floor: int) -> bool:
    """The queue should be told the floor: the device acked past what it knows."""
    return floor > saved_floor


def record_due(
    floor: int, recorded_floor: int, since_recorded: float, refresh_seconds: float
) -> bool:
    """The record should be rewritten: its floor is behind, or it would expire first
    (``DEVICES`` keeps a record for the retention; a quiet device must not outlive it)."""
    return floor != recorded_floor or since_recorded >= refresh_seconds


class Record(BaseModel):
    """A device's record, checked. ``floor`` None: the device's queue was never opened (its
    first connection got as far as claiming it); such a record rebuilds nothing."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    user: str
    client_id: str
    floor: int | None = Field(default=None, ge=0)
    sent: int = Field(default=0, ge=0)
    subscription: Subscription = Field(default_factory=Subscription)
    owner: str | None = None  # the session id that owns the device, None: nobody
    gateway: str | None = None  # the gateway instance of that session
    #: Written by a version before ownership (no ``owner`` key): nobody owns it, but a
    #: session of that version may still hold the device (ownership.py asks it).
    legacy: bool = Field(default=False, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        if isinstance(data, dict) and "legacy" not in data:
            return {**data, "legacy": "owner" not in data}
        return data

    @classmethod
    def new(cls, user: str, client_id: str) -> Record:
        """The record of a device seen for the first time."""
        return cls(user=user, client_id=client_id, owner=None)

    @property
    def position(self) -> Position:
        return Position(self.floor or 0, self.sent)

    def body(self) -> dict[str, Any]:
        """What is stored (JSON), ``subscription`` in its compact form."""
        out = self.model_dump(mode="json", exclude={"subscription"})
        out["subscription"] = self.subscription.as_dict()
        return out

    def owned_by(self, owner: str | None, gateway: str | None) -> Record:
        return self.model_copy(
            update={"owner": owner, "gateway": gateway if owner else None, "legacy": False}
        )

    def positioned(self, position: Position, subscription: Subscription) -> Record:
        return self.model_copy(
            update={"floor": position.floor, "sent": position.sent, "subscription": subscription}
        )

    @classmethod
    def parse(cls, name: str, data: bytes) -> Record | None:
        """The record, checked; an unreadable one counts as none (logged)."""
        try:
            return cls.model_validate_json(data or b"{}")
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "record"
            log.warning(
                "%s: unreadable record in DEVICES (%s: %s); treated as none",
                name,
                where,
                err["msg"],
            )
            return None
