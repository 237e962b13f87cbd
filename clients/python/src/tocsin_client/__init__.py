"""tocsin-client: the Python client of tocsin's WebSocket alert stream.

Depends on aiohttp only (no NATS, no server code). See docs/sdk.md of the repository.
"""

from .backoff import Backoff
from .client import Delivery, Frame, State, TocsinClient, TokenSource, token_expiry
from .errors import (
    AuthError,
    ClientClosed,
    HandshakeRefused,
    InvalidParameter,
    LimitError,
    ProtocolError,
    Replaced,
    SubscriptionRefused,
    TocsinError,
    Unreachable,
)
from .seen import DEFAULT_KEEP_SECONDS, MemorySeenStore, SeenStore

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_KEEP_SECONDS",
    "AuthError",
    "Backoff",
    "ClientClosed",
    "Delivery",
    "Frame",
    "HandshakeRefused",
    "InvalidParameter",
    "LimitError",
    "MemorySeenStore",
    "ProtocolError",
    "Replaced",
    "SeenStore",
    "State",
    "SubscriptionRefused",
    "TocsinClient",
    "TocsinError",
    "TokenSource",
    "Unreachable",
    "__version__",
    "token_expiry",
]
