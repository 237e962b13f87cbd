"""Reconnect delays: exponential with full jitter (docs/protocol.md §7)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """A random delay in [0, step); the step starts at ``initial``, doubles up to
    ``maximum``, and is reset once a connection got ``connection_established``."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random, repr=False)
    step: float = field(init=False)

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError("initial: must be > 0 and <= maximum")
        if self.factor < 1:
            raise ValueError("factor: must be >= 1")
        self.step = self.initial

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, self.step)
        self.step = min(self.maximum, self.step * self.factor)
        return delay

    def jitter(self) -> float:
        """A small random delay for "reconnect soon" (1001, a token rotation)."""
        return self.rng.uniform(0, self.initial)

    def reset(self) -> None:
        self.step = self.initial
