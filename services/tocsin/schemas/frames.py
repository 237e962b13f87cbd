"""Every WebSocket frame, each a pydantic model; one discriminated union per direction."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .alert import Alert
from .codes import ErrorCode


def _type_is_required(schema: dict[str, Any]) -> None:
    """Every frame carries ``type`` on the wire, although the models default it."""
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class _Frame(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra=_type_is_required)


# ---------------------------------------------------------------- server -> client


class ConnectionEstablished(_Frame):
    type: Literal["connection_established"] = "connection_established"
    connection_id: str
    user_id: str
    client_id: str
    ack_mode: Literal["client", "auto"]
    heartbeat_interval: float = Field(description="seconds between server pings")
    pending: int = Field(ge=0, description="alerts in this device's backlog, to be sent next")
    regions: list[str] = Field(description="region prefixes this connection receives ([] = all)")
    groups: list[str] = Field(
        default=[], description="the device's subscribed groups, kept across connections"
    )
    filters: dict[str, Any] = Field(
        default={}, description="the device's filters (set keys only), kept across connections"
    )


class AlertFrame(_Frame):
    type: Literal["alert"] = "alert"
    seq: int = Field(ge=1, description="increasing per device; ack it to acknowledge all up to it")
    alert: Alert
    redelivered: bool = False


class BacklogTruncated(_Frame):
    type: Literal["backlog_truncated"] = "backlog_truncated"
    dropped: int = Field(ge=1, description="oldest alerts skipped beyond TOCSIN_OFFLINE_QUEUE_MAX")


class BacklogSuperseded(_Frame):
    type: Literal["backlog_superseded"] = "backlog_superseded"
    alert_id: int | str = Field(description="an alert of the backlog that is not sent")
    superseded_by: int | str = Field(
        description="the later update or cancel that replaced it; it follows in the backlog"
    )


class SubscriptionResponse(_Frame):
    type: Literal["subscription_response"] = "subscription_response"
    action: Literal["subscribe", "unsubscribe", "update_filters"]
    groups: list[str] = Field(default=[], description="the groups of the request")
    status: Literal["ok", "denied", "invalid"]
    detail: str = ""
    subscribed: list[str] = Field(default=[], description="the device's groups after the action")
    filters: dict[str, Any] = Field(default={}, description="the device's filters after it")


class Ping(_Frame):
    type: Literal["ping"] = "ping"
    ts: float = Field(description="server time (unix seconds); echo it in pong for latency")


class RateLimitWarning(_Frame):
    type: Literal["rate_limit_warning"] = "rate_limit_warning"
    limit: int
    retry_after_s: float


class ConnectionStats(_Frame):
    type: Literal["connection_stats"] = "connection_stats"
    connection_id: str
    connected_seconds: float
    alerts_sent: int
    alerts_redelivered: int
    acks_received: int
    inflight: int
    mode: Literal["catchup", "live"]
    acked_seq: int
    latency_ms: float | None = Field(description="last ping→pong round trip")


class PushRegistered(_Frame):
    """The answer to ``register_push``: the device's registration is stored."""

    type: Literal["push_registered"] = "push_registered"
    provider: Literal["fcm"]
    client_id: str


class PushUnregistered(_Frame):
    """The answer to ``unregister_push``: the device has no registration any more."""

    type: Literal["push_unregistered"] = "push_unregistered"
    client_id: str


class Error(_Frame):
    type: Literal["error"] = "error"
    code: ErrorCode
    detail: str
    closes: bool = False


ServerFrame = Annotated[
    ConnectionEstablished
    | AlertFrame
    | BacklogTruncated
    | BacklogSuperseded
    | SubscriptionResponse
    | Ping
    | RateLimitWarning
    | ConnectionStats
    | PushRegistered
    | PushUnregistered
    | Error,
    Field(discriminator="type"),
]

# ---------------------------------------------------------------- client -> server


class Subscribe(_Frame):
    type: Literal["subscribe"] = "subscribe"
    groups: list[str] = Field(min_length=1, max_length=64)


class Unsubscribe(_Frame):
    type: Literal["unsubscribe"] = "unsubscribe"
    groups: list[str] = Field(min_length=1, max_length=64)


class UpdateFilters(_Frame):
    type: Literal["update_filters"] = "update_filters"
    filters: dict[str, Any]


class Pong(_Frame):
    type: Literal["pong"] = "pong"
    ts: float | None = Field(default=None, strict=True)


class GetStats(_Frame):
    type: Literal["get_stats"] = "get_stats"


class Ack(_Frame):
    type: Literal["ack"] = "ack"
    #: strict: a JSON integer, not "5", true, 5.0 or 1e3 (CONTRACT §6)
    seq: int = Field(ge=1, strict=True)


#: An FCM registration token is about 150-200 characters; this bounds what is stored.
MAX_PUSH_TOKEN = 4096


class PushRegistration(BaseModel):
    """A device's push registration as the app sends it (``register_push`` and the body of
    ``PUT /api/v1/devices/{client_id}/push``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    provider: Literal["fcm"] = Field(description="fcm (APNs devices too, through FCM)")
    token: str = Field(
        min_length=1,
        max_length=MAX_PUSH_TOKEN,
        pattern=r"^[\x21-\x7e]+$",
        description="the device's FCM registration token",
    )


class RegisterPush(_Frame):
    type: Literal["register_push"] = "register_push"
    provider: Literal["fcm"]
    token: str = Field(min_length=1, max_length=MAX_PUSH_TOKEN, pattern=r"^[\x21-\x7e]+$")

    @property
    def registration(self) -> PushRegistration:
        return PushRegistration(provider=self.provider, token=self.token)


class UnregisterPush(_Frame):
    type: Literal["unregister_push"] = "unregister_push"


ClientFrame = Annotated[
    Subscribe | Unsubscribe | UpdateFilters | Pong | GetStats | Ack | RegisterPush | UnregisterPush,
    Field(discriminator="type"),
]

client_frame_adapter: TypeAdapter[ClientFrame] = TypeAdapter(ClientFrame)
server_frame_adapter: TypeAdapter[ServerFrame] = TypeAdapter(ServerFrame)
