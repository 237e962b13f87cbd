"""Examples shared by the schema tests: the CONTRACT §4 alert and one frame of every type."""

from __future__ import annotations

from typing import Any

from tocsin.schemas import (
    Ack,
    Alert,
    AlertFrame,
    BacklogSuperseded,
    BacklogTruncated,
    ConnectionEstablished,
    ConnectionStats,
    Error,
    ErrorCode,
    GetStats,
    Ping,
    Pong,
    PushRegistered,
    PushUnregistered,
    RateLimitWarning,
    RegisterPush,
    Subscribe,
    SubscriptionResponse,
    UnregisterPush,
    Unsubscribe,
    UpdateFilters,
)

#: CONTRACT §4, verbatim.
CONTRACT_ALERT_JSON = """\
{
  "alert_id": 1042,
  "alert_level": "high",
  "alert_type": "outbreak_risk",
  "title": "Malaria outbreak risk rising",
  "message": "Risk model predicts ...",
  "priority": "urgent",
  "location": {"region": "KE-30", "lat": -0.09, "lon": 34.77},
  "risk_score": 0.82,
  "confidence_score": 0.9,
  "affected_population": 120000,
  "action_required": true,
  "action_url": "https://example.org/a/1042",
  "created_at": "2026-11-25T10:00:00Z",
  "expiry_time": "2026-11-26T10:00:00Z"
}
"""


def contract_alert() -> Alert:
    return Alert.model_validate_json(CONTRACT_ALERT_JSON)


def server_frames() -> list[Any]:
    """One of every server -> client frame (CONTRACT §6)."""
    return [
        ConnectionEstablished(
            connection_id="c1",
            user_id="alice",
            client_id="phone",
            ack_mode="client",
            heartbeat_interval=30,
            pending=3,
            regions=["KE"],
        ),
        AlertFrame(seq=7, alert=contract_alert(), redelivered=True),
        BacklogTruncated(dropped=12),
        BacklogSuperseded(alert_id=1042, superseded_by="cap-0f1e2d3c4b5a69788796a5b4c3d2e1f0"),
        SubscriptionResponse(action="subscribe", groups=["region:KE"], status="ok"),
        Ping(ts=1_790_000_000.5),
        RateLimitWarning(limit=60, retry_after_s=1.5),
        ConnectionStats(
            connection_id="c1",
            connected_seconds=12.5,
            alerts_sent=4,
            alerts_redelivered=1,
            acks_received=3,
            inflight=1,
            mode="live",
            acked_seq=6,
            latency_ms=None,
        ),
        PushRegistered(provider="fcm", client_id="phone"),
        PushUnregistered(client_id="phone"),
        Error(code=ErrorCode.INVALID_FRAME, detail="seq: field required", closes=False),
    ]


def client_frames() -> list[Any]:
    """One of every client -> server frame (CONTRACT §6)."""
    return [
        Subscribe(groups=["region:KE", "level:high"]),
        Unsubscribe(groups=["type:outbreak_risk"]),
        UpdateFilters(filters={"risk_threshold": 0.5, "alert_types": "outbreak_risk"}),
        Pong(ts=1_790_000_000.5),
        Pong(),
        GetStats(),
        Ack(seq=42),
        RegisterPush(provider="fcm", token="fcm-token-1"),
        UnregisterPush(),
    ]
