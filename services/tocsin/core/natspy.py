"""What tocsin relies on inside nats-py (2.16), where it has no public call: in one place.

Each function reaches into a private attribute on purpose, and
tests/unit/test_natspy.py fails when a nats-py upgrade moves that attribute, instead of a
silent change of behaviour in production.
"""

from __future__ import annotations

from typing import Any

from nats.aio.client import Client


def drop_unsent(nc: Client) -> None:
    """Forget what nats-py buffered for a connection that is gone: it would send it on the
    next connection (``Client._pending``), and a session's request written before its
    gateway lost NATS would then reach the device's queue after another session claimed it."""
    nc._pending.clear()
    nc._pending_data_size = 0


def ordered_resume_after(sub: Any, seq: int) -> bool:
    """An ordered consumer that has not delivered yet recreates itself after a reconnect
    from the last stream sequence it saw + 1, which is 0 + 1: the whole stream again. Tell
    it ``seq`` was the last one (the stream's last sequence when it was created, for a
    ``DeliverPolicy.NEW`` consumer). True if it was set."""
    inner = getattr(sub, "_sub", sub)  # js.subscribe returns a wrapper of the subscription
    jsi = getattr(inner, "_jsi", None)
    if jsi is None or getattr(jsi, "_sseq", None) != 0:
        return False
    jsi._sseq = seq
    return True
