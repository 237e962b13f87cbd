"""The gateway's shared state: connections to NATS, the live feed, the sessions, the ticker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from tocsin.core.alert_index import Supersessions
from tocsin.core.auth import TokenVerifier
from tocsin.core.naming import Names
from tocsin.core.natspy import drop_unsent
from tocsin.core.settings import Settings
from tocsin.schemas import Close

from .collector import Collector
from .guard import Ban, Guard
from .journal import Journal
from .live import LiveFeed
from .ownership import Lost, Owners, State
from .queue import DeviceQueues
from .records import DeviceRecords
from .registry import Sessions
from .stats import Stats

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger(__name__)

#: How often the ticker looks for sessions whose visit is due. Each pass visits what came
#: due since the last one, and a ping visit wakes that session's sender: with 10,000
#: devices on 15 s heartbeats a pass every 0.25 s visited ~330 sessions at once and held
#: the loop 5-11 ms, the tail of the targeted alerts that came meanwhile; passes every
#: 0.05 s are a fifth of that (docs/benchmarks.md, "The targeted tail").
TICK_SECONDS = 0.05
#: Sessions with nothing in flight are ticked this often (heartbeats, expiry, checkpoints).
SWEEP_SECONDS = 1.0
#: ...and those with alerts in flight at most this often.
SWEEP_MIN_SECONDS = 0.25
#: The ticker yields to the event loop after this many sessions.
TICK_BATCH = 64
#: Checkpoints (consumer resets) in flight at once, so a burst of acks can't flood the server.
CHECKPOINT_CONCURRENCY = 64


def sweep_seconds(heartbeat: float) -> float:
    """How often the ticker visits each session: every SWEEP_SECONDS, or twice a heartbeat
    where the heartbeat is shorter (two silent heartbeats must be seen as they pass), never
    more often than SWEEP_MIN_SECONDS (nor than it runs)."""
    return max(TICK_SECONDS, SWEEP_MIN_SECONDS, min(SWEEP_SECONDS, heartbeat / 2))


class Gateway:
    def __init__(self, settings: Settings, nc: Client, js: JetStreamContext) -> None:
        self.settings = settings
        self.names = Names(settings.namespace)
        self.instance = uuid.uuid4().hex[:12]
        self.nc = nc
        self.js = js
        self.verifier = TokenVerifier.from_settings(settings)
        self.queues = DeviceQueues(nc, js, settings, self.names)
        self.records = DeviceRecords(js, self.names)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.owners = Owners(
            nc, self.records, self.names, self.instance, settings.takeover_seconds, self.spawn
        )
        self.feed = LiveFeed(js, self.names)
        #: Which alerts a later update or cancel superseded: never replayed from a backlog.
        self.supersessions = Supersessions()
        self.guard = Guard(nc, js, settings, self.names, self.instance)
        self.guard.on_ban = self._on_ban
        self.sessions = Sessions()  # the registry: open sessions, totals of closed ones
        self.sweep = sweep_seconds(settings.heartbeat_seconds)
        self.journal = Journal(js, self.names, self.instance)
        self.collector = Collector()
        self._ticker: asyncio.Task[None] | None = None
        self.shutting_down = False
        self.stats = Stats(self)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def start(self) -> None:
        await self.guard.start()
        await self.owners.start()
        await self.feed.start()
        await self.supersessions.start(self.js, self.names)  # read whole before any backlog
        await self.stats.start()
        # The server has the responders' subscriptions (takeover, stats) once start returns:
        # a request right after start-up finds them instead of "no responders".
        await self.nc.flush()
        self.collector.watch()
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def stop(self) -> None:
        self.collector.unwatch()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        await self.feed.stop()
        await self.supersessions.stop()
        await self.stats.stop()
        await self.owners.stop()
        await self.guard.stop()

    def _on_ban(self, ban: Ban) -> None:
        """A user was banned (here or on another instance): its sockets here close, 1008."""
        for session in list(self.sessions):
            if session.device.user_id == ban.sub:
                session.close(Close.POLICY_VIOLATION, f"banned: {ban.reason}")

    # --- the NATS connection comes and goes ----------------------------------------
    async def on_disconnected(self) -> None:
        """nats-py lost the server and is about to reconnect. From now on no session acts
        for its device until it has reclaimed it: meanwhile a newer connection of the device
        elsewhere finds no responder here and may claim it. What was written for the lost
        connection and not yet sent must not be sent on the next one either."""
        self.owners.suspend_all()
        drop_unsent(self.nc)

    async def on_reconnected(self) -> None:
        self.owners.reconnected_at = time.monotonic()
        self.spawn(self._reclaim())
        self.spawn(self._rewatch())

    async def _rewatch(self) -> None:
        try:
            await self.guard.rewatch()
        except Exception as exc:  # tried again at the next reconnect; bans still expire
            log.warning("could not watch bans and leases again: %s", exc)

    async def _reclaim(self) -> None:
        """Each suspended session writes its record as owner, conditional on the one it last
        wrote: if nobody claimed the device meanwhile it owns it again, else it closes."""
        gate = asyncio.Semaphore(CHECKPOINT_CONCURRENCY)

        async def one(session: Session) -> None:
            claim = session.claim
            async with gate:
                if claim is None or claim.state is not State.SUSPENDED:
                    return
                try:
                    await self.owners.save(claim, session.current_record(), reclaim=True)
                except Lost:
                    session.close(Close.REPLACED, "another connection of this device took over")
                except Exception as exc:
                    log.warning("%s: could not reclaim the device: %s", session.consumer, exc)
                    session.close(Close.BACKEND_UNAVAILABLE, "alert store unavailable")

        await asyncio.gather(*(one(s) for s in list(self.sessions)))

    async def _tick_loop(self) -> None:
        checkpointing: asyncio.Task[None] | None = None
        journaling: asyncio.Task[None] | None = None
        next_journal = time.monotonic() + self.settings.checkpoint_seconds
        stall, stall_at = 0.0, 0.0  # the longest lateness of the last SWEEP_SECONDS
        while True:
            due = time.monotonic() + TICK_SECONDS
            await asyncio.sleep(TICK_SECONDS)
            now_mono, now = time.monotonic(), time.time()
            # How late this pass is: while the loop was stalled (GC, a starved CPU) the
            # clients' pongs waited unread in socket buffers, so the stall is not theirs.
            # It counts for a while after it: the passes right after a stall come before
            # the loop has read everything that waited (every 0.05 s, not 0.25 s, now).
            late = max(0.0, now_mono - due)
            if late >= stall or now_mono - stall_at > SWEEP_SECONDS:
                stall, stall_at = late, now_mono
            late = stall
            dirty = []
            # Each session when its business is due (Session.next_visit): after a sweep
            # while alerts are in flight, else at its next ping, silence, expiry or save.
            # Visiting all 10,000 idle sessions once a second cost 19% of a core (and every
            # 0.25 s 26%, stalling the loop ~75 ms at a time); it also yields every
            # TICK_BATCH.
            self.collector.tick(now_mono, len(self.sessions))
            self.sessions.task("collector").ran()
            for i, session in enumerate(self.sessions.due(now_mono)):
                session.tick(now_mono, now, late)
                checkpoint_due = session.needs_checkpoint() and now_mono >= session.next_checkpoint
                if checkpoint_due or session.record_due(now_mono):
                    dirty.append(session)  # seen again after a sweep, below
                else:
                    self.sessions.schedule(session, session.next_visit(now_mono, now))
                if i % TICK_BATCH == TICK_BATCH - 1:
                    await asyncio.sleep(0)
            busy = checkpointing is not None and not checkpointing.done()
            if dirty and not busy:
                # Each live session's queue is reset at most once per queue_save_seconds, at
                # its own phase (the journal holds the floor meanwhile), its record at most
                # once per RECORD_SECONDS; in the background, so that a slow NATS never
                # delays pings or closes.
                for session in dirty:
                    session.checkpoint_planned(now_mono)
                checkpointing = self.spawn(self._checkpoint(dirty))
            for session in dirty:  # saved meanwhile, or due again after the running pass
                self.sessions.schedule(session, now_mono + self.sweep)
            if now_mono >= next_journal and (journaling is None or journaling.done()):
                next_journal = now_mono + self.settings.checkpoint_seconds
                journaling = self.spawn(self._journal())
            self.sessions.task("ticker").ran()

    async def _journal(self) -> None:
        """The acked floors of live devices whose queues are behind, in a few messages
        (journal.py): what a crash would otherwise repeat."""
        try:
            await self.journal.write(list(self.sessions))
        except Exception as exc:  # written at the next interval
            log.warning("positions journal not written: %s", exc)
            self.sessions.task("checkpoints").ran(exc)

    async def _checkpoint(self, sessions: list[Session]) -> None:
        gate = asyncio.Semaphore(CHECKPOINT_CONCURRENCY)

        async def one(session: Session) -> None:
            async with gate:
                if session.needs_checkpoint():
                    try:
                        await session.checkpoint()
                    except Exception as exc:  # retried at the next tick; floor in memory
                        log.warning("checkpoint of %s failed: %s", session.consumer, exc)
                        self.sessions.task("checkpoints").ran(exc)
                # Also when the checkpoint failed (the queue's node down): the record is
                # what a rebuild starts from.
                if session.record_due(time.monotonic()):
                    await session.record()

        await asyncio.gather(*(one(s) for s in sessions))
        self.sessions.task("checkpoints").ran()

    @property
    def background_tasks_running(self) -> bool:
        return self._ticker is not None and not self._ticker.done() and self.feed.running

    def task_statuses(self) -> dict[str, dict[str, object]]:
        """Each background task: running, its last pass, its last error. The ticker runs
        heartbeats, resends and token expiry, and starts the checkpoints and record writes
        and the collector's passes; the live feed is the ordered consumer on ALERTS."""
        ticking = self._ticker is not None and not self._ticker.done()
        running = {
            "ticker": ticking,
            "checkpoints": ticking,
            "records": ticking,
            "collector": ticking,
            "live_feed": self.feed.running and self.nc.is_connected,
            "offline_queues": self.nc.is_connected,
        }
        out = {}
        for name, alive in running.items():
            status = self.sessions.task(name)
            status.running = alive
            out[name] = status.as_dict()
        return out
