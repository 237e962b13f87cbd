"""The gateway's open sessions, and what the closed ones did: the counters ``/metrics``
and the stats read (they never write them).

The handler adds a session once it is served and discards it when it ends; on the way out
its counters are added to :class:`Totals`, so a counter never goes down.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from tocsin.schemas import Close

if TYPE_CHECKING:
    from .session import Session

#: ``reason`` of a close the server did not choose (the client closed or went away).
CLIENT_CLOSED = "client"
#: Every reason is known from the start (counted from 0), so that rate() sees the first.
REASONS = (CLIENT_CLOSED, *(code.name.lower() for code in Close))


def close_reason(code: int | None) -> str:
    if code is None:
        return CLIENT_CLOSED
    try:
        return str(Close(code).name).lower()
    except ValueError:
        return str(code)


class Totals:
    """What closed sessions did, and how they ended."""

    def __init__(self) -> None:
        self.opened = 0
        self.sent = 0
        self.redelivered = 0
        self.acks = 0
        self.closes: Counter[str] = Counter()

    def session_left(self, session: Session) -> None:
        self.sent += session.sent
        self.redelivered += session.redelivered
        self.acks += session.acks
        code = session.closing[0] if session.closing else None
        self.closes[close_reason(code)] += 1


class Sessions(set["Session"]):
    """``Gateway.sessions``: the open sessions, counted in; their counters added up on the
    way out."""

    def __init__(self, sessions: Iterable[Session] = ()) -> None:
        super().__init__(sessions)
        self.totals = Totals()

    def add(self, session: Session) -> None:
        if session not in self:
            self.totals.opened += 1
            super().add(session)

    def discard(self, session: object) -> None:
        if session in self:
            super().discard(session)
            self.totals.session_left(session)  # type: ignore[arg-type]

    def remove(self, session: object) -> None:
        if session not in self:
            raise KeyError(session)
        self.discard(session)
