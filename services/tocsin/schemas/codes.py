"""Close codes and error codes: one table, as centrifuge's disconnect.go and starlette's status.py.

Codes below 4000 are RFC 6455's; 4000-4999 are tocsin's. What a client should do is
written beside each code (and in docs/protocol.md): the number alone carries no advice.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class Close(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect, perhaps to another instance
    POLICY_VIOLATION = 1008  # banned (abuse protection)
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    HEARTBEAT_TIMEOUT = 4000  # nothing from the client for two heartbeat intervals: reconnect
    SLOW_CLIENT = 4008  # the client did not read what was sent for two heartbeats: aborted
    ACK_TIMEOUT = 4408  # a full in-flight window, no ack for TOCSIN_ACK_TIMEOUT_SECONDS: reconnect
    REPLACED = 4009  # the same device connected again elsewhere: do not reconnect this one
    TOKEN_EXPIRED = 4401  # CONTRACT §3, token expired while connected: get a new token
    BACKEND_UNAVAILABLE = 4503  # the alert store is unreachable: reconnect with backoff


class ErrorCode(StrEnum):
    """``code`` of the ``error`` frame; the connection stays open unless ``closes`` is true."""

    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"  # wrong or missing fields; ``detail`` names them
    UNKNOWN_TYPE = "unknown_type"
    FRAME_TOO_LARGE = "frame_too_large"  # over 64 KiB
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    INVALID_ACK = "invalid_ack"  # ack of a seq that was never sent on this connection
    NOT_SUPPORTED = "not_supported"  # a known frame whose feature this build lacks
    INTERNAL = "internal"


#: Text frames above this size get ``frame_too_large`` (CONTRACT §6).
MAX_CLIENT_FRAME_BYTES = 64 * 1024
