"""One device, one session: who may act for a device, decided by JetStream.

A device's record in ``DEVICES`` (records.py) names the session that owns the device and
its gateway. A session **claims** the device before it touches the device's queue: it
writes the record with itself as owner, conditional on the record it read. Of two sessions
claiming at once, JetStream accepts exactly one write; the other learns it lost the race
(:class:`Superseded`). When the record names an older session, the newcomer first asks that
session's gateway to let it go (``tocsin.gateway.<instance>.takeover``); the gateway stops
the session, which saves its position and writes the record without owner (the release),
and only then answers. A gateway whose NATS connection is gone cannot answer (no
responders): its sessions are suspended and can write nothing, so the claim proceeds.

Every later write of the owner is conditional on the sequence of the record it last wrote:
once someone else has written the record, the old owner's next write is refused and it
knows it lost the device (:class:`Lost`). Between writes, a session acts only while its
claim is ``OWNING`` (:meth:`Claim.check`). docs/architecture.md §9 argues why two sessions
can never own one device at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import ServiceUnavailableError

from tocsin.core.naming import Names
from tocsin.schemas import Close

from .device import Record
from .events import Event
from .queue import QueueError
from .records import Conflict, DeviceRecords

log = logging.getLogger(__name__)

#: One takeover request waits this long at most for the older session's gateway to answer;
#: the newcomer asks again until ``TOCSIN_TAKEOVER_SECONDS`` have passed.
ASK_SECONDS = 5.0
#: For this long after the gateway's own NATS reconnect, an owner's gateway without a
#: responder is asked again rather than taken over: it is likely reconnecting as well.
RECONNECT_GRACE_SECONDS = 3.0
#: JetStream did not answer (a leader is being elected, the server is busy): try again.
RETRYABLE = (nats.errors.TimeoutError, nats.errors.NoRespondersError, ServiceUnavailableError)

#: Connections of one gateway that claim their device and open its queue at once; the others
#: wait their turn before the first JetStream call. A reconnect storm (every device of a
#: restarted gateway within seconds) would otherwise put thousands of requests in flight:
#: their replies wait behind each other in one event loop until they time out, are retried
#: and time out again (measured: of 10,000 devices at most 124 had their backlog after 300 s;
#: with the bound all of them in 62 s; docs/reliability.md "Reconnect storms").
OPENS_AT_ONCE = 64
#: Sessions of one gateway that save their position and let go at once (a SIGTERM ends
#: them all together).
RELEASES_AT_ONCE = 256

T = TypeVar("T")


class Lost(QueueError):
    """The session no longer owns its device: another connection claimed it."""


class Suspended(QueueError):
    """The gateway lost NATS: its sessions may not act until they reclaim their devices."""


class Superseded(Exception):
    """Another connection of the device claimed it while this one was claiming it."""


class Busy(Exception):
    """The older connection of the device did not let go within ``TOCSIN_TAKEOVER_SECONDS``."""


class State(enum.StrEnum):
    OWNING = "owning"
    SUSPENDED = "suspended"  # NATS connection lost: may own, may not act
    LOST = "lost"  # someone else wrote the record: never acts again
    RELEASED = "released"  # let go of the device


@dataclass(eq=False)
class Claim:
    """A session's ownership of a device. ``seq`` is the sequence of the record it last
    wrote; ``epoch`` the one it claimed with."""

    name: str
    session: str
    gateway: str
    seq: int
    found: Record | None  # the device's record before the claim
    state: State = State.OWNING
    usable: asyncio.Event = field(default_factory=Event)
    #: Set while the claim is not SUSPENDED: what a session that ended off NATS waits for.
    settled: asyncio.Event = field(default_factory=Event)
    #: It was SUSPENDED at some time: what the session knows of its queue may be stale (a
    #: restarted nats-server may have lost its latest writes), so its close saves anyway.
    was_suspended: bool = False

    def __post_init__(self) -> None:
        self.epoch = self.seq
        self.usable.set()
        self.settled.set()

    @property
    def owning(self) -> bool:
        return self.state is State.OWNING

    def check(self) -> None:
        """Raise unless the session may act for its device now: called right before every
        request that reads or changes the device's queue or record."""
        if self.state is State.OWNING:
            return
        if self.state is State.SUSPENDED:
            raise Suspended(f"{self.name}: NATS connection lost")
        raise Lost(f"{self.name}: {self.state}")

    def _become(self, state: State) -> None:
        self.state = state
        if state is State.OWNING:
            self.usable.set()
        else:
            self.usable.clear()
        if state is State.SUSPENDED:
            self.was_suspended = True
            self.settled.clear()
        else:
            self.settled.set()


class Answer(enum.Enum):
    """What asking an owner's gateway to let its device go came to."""

    RELEASED = "released"  # it let go (or there was no gateway to ask): read the record again
    GONE = "gone"  # no responders: the gateway is off NATS, the record is the one read
    NO = "no"  # not (yet): ask again until the deadline


class Holder(Protocol):
    """What the takeover responder needs of a session."""

    id: str
    consumer: str
    finished: asyncio.Event

    def close(self, code: int, reason: str) -> None: ...


class Owners:
    """Claims, conditional record writes and the takeover responder of one gateway."""

    def __init__(
        self,
        nc: Client,
        records: DeviceRecords,
        names: Names,
        instance: str,
        takeover_seconds: float,
        spawn: Callable[[Coroutine[Any, Any, Any]], Any],
    ) -> None:
        self._nc = nc
        self.records = records
        self._names = names
        self.instance = instance
        self._takeover_seconds = takeover_seconds
        self._spawn = spawn
        self._sub: Any = None
        #: Sessions of this gateway by id, from before they claim until they let go.
        self.holders: dict[str, Holder] = {}
        self.claims: dict[str, Claim] = {}
        self.counts = {"taken_over": 0, "superseded": 0, "busy": 0, "lost": 0}
        self._taken: set[str] = set()  # holders asked to let go (counted once each)
        self.opening = asyncio.Semaphore(OPENS_AT_ONCE)  # held from the claim to the open
        self.releasing = asyncio.Semaphore(RELEASES_AT_ONCE)  # held by a save and release
        self.reconnected_at = -1e18  # monotonic: this gateway's last NATS reconnect

    async def start(self) -> None:
        subject = self._names.gateway_takeover_subject(self.instance)
        self._sub = await self._nc.subscribe(subject, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    def register(self, holder: Holder) -> None:
        self.holders[holder.id] = holder

    def unregister(self, holder: Holder) -> None:
        self.holders.pop(holder.id, None)
        self.claims.pop(holder.id, None)
        self._taken.discard(holder.id)

    # ------------------------------------------------------------ claiming
    async def acquire(self, holder: Holder, user: str, client_id: str) -> Claim:
        """Make ``holder`` the owner of its device, after the older owner let go. Raises
        :class:`Superseded` when a third connection claimed it meanwhile, :class:`Busy`
        when the older one did not let go in time."""
        name = holder.consumer
        deadline = time.monotonic() + self._takeover_seconds
        first: str | None = None
        seen = False
        let_go: set[tuple[str, int]] = set()  # (owner, record seq) that need not be asked
        known = False  # seq and record are the record as it stands: no need to read it
        seq, record = 0, None
        while True:
            if time.monotonic() > deadline:
                self.counts["busy"] += 1
                raise Busy(f"{name}: not claimed within the takeover deadline")
            if not known:
                seq, record = await self._retrying(lambda: self.records.read(name), deadline)
            known = False
            owner = record.owner if record is not None else None
            if owner == holder.id:  # our own write landed though its answer was lost: it
                return self._claimed(holder, seq, record)  # holds what the record was
            if not seen:
                first, seen = owner, True
            elif owner is not None and owner != first and (owner, seq) not in let_go:
                self.counts["superseded"] += 1
                raise Superseded(f"{name}: claimed by another connection meanwhile")
            if record is not None and record.legacy and not let_go:
                await self._ask_legacy(name, holder.id, deadline)
                let_go.add(("", seq))
            if owner is None or (owner, seq) in let_go:
                mine = (record or Record.new(user, client_id)).owned_by(holder.id, self.instance)
                try:
                    new = await self._retrying(
                        functools.partial(self.records.write, name, mine, seq), deadline
                    )
                except Conflict:
                    continue  # written meanwhile: read it again
                return self._claimed(holder, new, record)
            assert record is not None
            answer = await self._ask(name, record, holder.id, deadline)
            if answer is not Answer.NO:
                let_go.add((owner, seq))
                # GONE: its gateway is off NATS and wrote nothing: claim on the seq read,
                # without reading the record again. A write meanwhile (the owner back and
                # saving, a third claim) makes the claim a conflict: then it is read again.
                known = answer is Answer.GONE
            elif time.monotonic() >= deadline:
                self.counts["busy"] += 1
                raise Busy(f"{name}: its connection on {record.gateway} does not let go")

    def _claimed(self, holder: Holder, seq: int, found: Record | None) -> Claim:
        claim = Claim(holder.consumer, holder.id, self.instance, seq, found)
        self.claims[holder.id] = claim
        return claim

    async def _ask(self, name: str, record: Record, by: str, deadline: float) -> Answer:
        """Ask the owner's gateway to let the device go: RELEASED once it did, GONE once that
        gateway is not on NATS (its sessions are suspended: nothing of it can act)."""
        if record.gateway is None:
            return Answer.RELEASED
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return Answer.NO
        subject = self._names.gateway_takeover_subject(record.gateway)
        request = {"consumer": name, "owner": record.owner, "by": by}
        try:
            reply = await self._nc.request(
                subject, orjson.dumps(request), timeout=min(ASK_SECONDS, remaining)
            )
        except nats.errors.NoRespondersError:
            # Right after this gateway came back to NATS, the owner's gateway may be on its
            # way back too (a NATS restart drops every gateway at once): give it a moment to
            # resubscribe, or its session's unsaved position would be lost to this claim.
            wait = self.reconnected_at + RECONNECT_GRACE_SECONDS - time.monotonic()
            if wait > 0 and deadline - time.monotonic() > wait:
                await asyncio.sleep(min(wait, 0.2))
                return Answer.NO
            return Answer.GONE
        except TimeoutError:  # nats.errors.TimeoutError is one
            return Answer.NO
        return Answer.RELEASED if reply.data == b"released" else Answer.NO

    async def _ask_legacy(self, name: str, by: str, deadline: float) -> None:
        """A record without ``owner`` was written by a version before ownership, whose
        sessions listen on a subject per device and save before they answer: during a
        rolling upgrade such a session may still hold the device."""
        remaining = deadline - time.monotonic()
        with contextlib.suppress(nats.errors.NoRespondersError, TimeoutError):
            await self._nc.request(
                self._names.legacy_takeover_subject(name),
                by.encode(),
                timeout=max(0.1, min(ASK_SECONDS, remaining)),
            )

    @staticmethod
    async def _retrying(op: Callable[[], Awaitable[T]], deadline: float) -> T:
        delay = 0.1
        while True:
            try:
                return await op()
            except RETRYABLE:
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    # ------------------------------------------------------------ writing as the owner
    async def save(self, claim: Claim, record: Record, *, reclaim: bool = False) -> None:
        """Write the device's record as its owner. Raises :class:`Lost` (and the claim is
        lost for good) when someone else wrote it since. ``reclaim``: after a NATS
        reconnect, the one write a suspended claim may make; it owns again if it succeeds."""
        if not (reclaim and claim.state is State.SUSPENDED):
            claim.check()
        mine = record.owned_by(claim.session, claim.gateway)
        try:
            claim.seq = await self.records.write(claim.name, mine, claim.seq)
        except Conflict:
            seq, current = await self.records.read(claim.name)
            if current is None or current.owner != claim.session:
                self._lose(claim, current)
                raise Lost(f"{claim.name}: claimed by another connection") from None
            # Our own write landed although its answer was lost: go on from it.
            try:
                claim.seq = await self.records.write(claim.name, mine, seq)
            except Conflict:
                self._lose(claim, None)
                raise Lost(f"{claim.name}: claimed by another connection") from None
        if reclaim:
            claim._become(State.OWNING)

    async def release(self, claim: Claim, record: Record) -> None:
        """Let go of the device: the record keeps the final position, without owner. After
        this the session acts no more, whether or not the write succeeded."""
        try:
            if claim.owning:
                claim.seq = await self.records.write(
                    claim.name, record.owned_by(None, None), claim.seq
                )
        except Conflict:
            self._lose(claim, None)
        finally:
            if claim.state is not State.LOST:
                claim._become(State.RELEASED)

    def _lose(self, claim: Claim, current: Record | None) -> None:
        claim._become(State.LOST)
        self.counts["lost"] += 1
        by = f" by {current.owner} on {current.gateway}" if current and current.owner else ""
        log.warning("%s: session %s lost the device%s", claim.name, claim.session, by)

    # ------------------------------------------------------------ NATS connection lost
    def suspend_all(self) -> None:
        """The gateway lost NATS: no session acts until it has reclaimed its device. (A
        newcomer meanwhile finds no responder here and claims the device.)"""
        for claim in self.claims.values():
            if claim.state is State.OWNING:
                claim._become(State.SUSPENDED)

    # ------------------------------------------------------------ the responder
    async def _on_request(self, msg: Msg) -> None:
        # nats-py runs a subscription's callbacks one at a time: one slow takeover must not
        # hold up the others.
        self._spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        try:
            request = orjson.loads(msg.data)
            consumer, owner = str(request["consumer"]), str(request["owner"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("bad takeover request on %s: %s", msg.subject, exc)
            return
        holder = self.holders.get(owner)
        if holder is not None and holder.consumer == consumer:
            if owner not in self._taken:  # several newcomers may ask about one session
                self._taken.add(owner)
                self.counts["taken_over"] += 1
            holder.close(Close.REPLACED, "the same device connected again")
            try:
                async with asyncio.timeout(self._takeover_seconds):
                    await holder.finished.wait()
            except TimeoutError:  # unanswered: the newcomer asks again or gives up
                log.warning("%s: session %s did not let go in time", consumer, owner)
                return
        # Not (or no longer) a session of this gateway: nothing here acts for the device.
        if msg.reply:
            with contextlib.suppress(Exception):
                await self._nc.publish(msg.reply, b"released")
