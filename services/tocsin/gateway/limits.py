"""The per-connection rate limit on client frames (CONTRACT §6): a token bucket.

``TOCSIN_MAX_MESSAGES_PER_MINUTE`` refills it, ``TOCSIN_RATE_LIMIT_BURST`` is its size. A
frame over the limit is dropped and answered with a ``rate_limit_warning``, itself sent at
most once per second per connection; ``ack`` and ``pong`` are never counted (the server's
own sends bound them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Warnings to one connection are at least this far apart (the warning is rate-limited too).
WARNING_INTERVAL = 1.0
#: Frames dropped since the last warning past which the connection is closed (1008): a
#: client that goes on sending this much after being told to wait is flooding, and every
#: frame it sends costs the gateway a read and a parse that others wait behind.
FLOOD_FRAMES = 50


@dataclass
class TokenBucket:
    per_minute: int
    burst: int
    tokens: float = field(init=False)
    at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.tokens = float(self.burst)

    def take(self, now: float) -> float:
        """Spend one token: 0.0 if there was one, else the seconds until there will be."""
        rate = self.per_minute / 60.0
        if self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / rate


@dataclass
class RateLimit:
    """One connection's limit: the bucket and when it may be warned again."""

    bucket: TokenBucket
    warn_after: float = 0.0
    dropped: int = 0
    unheeded: int = 0  # dropped since the last warning

    def admit(self, now: float) -> tuple[bool, float | None]:
        """(whether the frame is taken, the ``retry_after_s`` to warn with, or None)."""
        wait = self.bucket.take(now)
        if not wait:
            return True, None
        self.dropped += 1
        if now < self.warn_after:
            self.unheeded += 1
            return False, None
        self.warn_after = now + max(WARNING_INTERVAL, wait)
        self.unheeded = 0
        return False, round(wait, 3)

    @property
    def flooding(self) -> bool:
        return self.unheeded >= FLOOD_FRAMES
