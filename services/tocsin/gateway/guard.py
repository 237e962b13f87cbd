"""What holds across gateway instances against abuse (CONTRACT §6): bans, and each user's
connection slots. Both live in one JetStream KV bucket, ``GUARD`` (namespaced like the
streams), so every instance sees the same bans and counts the same connections.

Keys never carry user input: a user is the first 32 hex digits of the SHA-256 of its
``sub``, a device the first 16 of its ``client_id``'s (the values name them in full).

* ``ban.<user>``: a ban. Written with a per-message TTL (``Nats-TTL``), so it ends by
  itself; an operator lifts it early by deleting the key (``tocsin ban lift``). Every
  gateway watches ``ban.>``: a new ban closes that user's sockets with 1008 everywhere, and
  handshakes check the watched set (429 ``banned`` with ``Retry-After``).
* ``gw.<instance>``: a gateway's lease, written every ``LEASE_SECONDS / 3`` with a TTL of
  ``LEASE_SECONDS``. Every gateway watches ``gw.>``; an instance not heard for a lease is
  dead (killed, or cut off from NATS), and its slots count no more.
* ``conn.<user>.<instance>.<device>``: one open connection of a device on an instance.
  A handshake writes its slot, then counts the user's slots: those of live instances, not
  counting the device's own slot on another instance (a reconnect that is taking over its
  old connection), over ``TOCSIN_MAX_CONNECTIONS_PER_USER`` refuse it (429
  ``too_many_connections``) and its slot is removed. Every gateway watches ``conn.>`` and
  counts from what it watched, once the watch has delivered its own write (in stream
  order: every slot written before it is then known); a watch not there yet, or a count
  over the cap, is checked by listing the user's slots (one ``STREAM.INFO`` with a subject
  filter), so a slot the watch missed the end of can refuse no one. Of two handshakes at
  the same instant the later write sees the earlier, so they are never both admitted
  over the cap (both may be refused by the listing; the client's retry with jitter lets
  one in). A slot goes with its connection (a purge marker that the watches see, itself
  gone a second later; a listing within that second still counts it); a gateway also
  purges, every lease, slots of its own that no open connection holds, and those of dead
  instances it meets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.kv import KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT, KeyValue

from tocsin.core.naming import Names
from tocsin.core.settings import Settings

from .ownership import OPENS_AT_ONCE, RELEASES_AT_ONCE

log = logging.getLogger(__name__)
audit = logging.getLogger("tocsin.audit")

#: A gateway not heard for this long is dead: its connection slots are free again.
LEASE_SECONDS = 15.0
#: A handshake waits this long at most for the slots watch to deliver its slot's write;
#: then its user's slots are listed instead.
SLOT_WATCH_SECONDS = 1.0
#: A removed slot's purge marker stays this long (the watches have it within milliseconds;
#: until it goes, a listing counts it as a slot).
SLOT_MARKER_SECONDS = 1


def user_key(sub: str) -> str:
    return hashlib.sha256(sub.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def device_key(client_id: str) -> str:
    return hashlib.sha256(client_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]


@dataclass(frozen=True)
class Ban:
    sub: str
    until: float  # unix seconds
    reason: str
    by: str

    @property
    def remaining(self) -> float:
        return max(0.0, self.until - time.time())

    def as_dict(self) -> dict[str, Any]:
        return {"sub": self.sub, "until": self.until, "reason": self.reason, "by": self.by}

    @classmethod
    def parse(cls, raw: bytes) -> Ban | None:
        try:
            d = orjson.loads(raw)
            return cls(str(d["sub"]), float(d["until"]), str(d["reason"]), str(d["by"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None


class Refused(Exception):
    """A handshake the guard refuses: HTTP 429 with ``error`` and ``retry_after``."""

    def __init__(self, error: str, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.error, self.detail, self.retry_after = error, detail, retry_after


async def guard_bucket(js: JetStreamContext, settings: Settings, names: Names) -> KeyValue:
    """The ``GUARD`` bucket, created if it is not there yet."""
    try:
        return await js.key_value(names.guard_bucket)
    except Exception:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=names.guard_bucket,
                description="tocsin: bans, connection slots, gateway leases",
                history=1,
                storage=StorageType.FILE,
                replicas=settings.replicas,
            )
        )


async def add_ban(
    js: JetStreamContext, names: Names, sub: str, seconds: float, reason: str, by: str
) -> Ban:
    """Ban ``sub`` for ``seconds`` (whole seconds: the TTL's unit) on every instance."""
    ttl = max(1, math.ceil(seconds))
    ban = Ban(sub, time.time() + ttl, reason, by)
    subject = f"$KV.{names.guard_bucket}.ban.{user_key(sub)}"
    await js.publish(subject, orjson.dumps(ban.as_dict()), msg_ttl=ttl)
    return ban


async def lift_ban(kv: KeyValue, sub: str) -> bool:
    """Lift ``sub``'s ban; False if there was none."""
    key = f"ban.{user_key(sub)}"
    try:
        entry = await kv.get(key)
    except Exception:
        return False
    if entry.value is None or Ban.parse(entry.value) is None:
        return False
    await kv.delete(key)
    return True


async def list_bans(js: JetStreamContext, kv: KeyValue, names: Names) -> list[Ban]:
    """The bans in force, soonest ending first."""
    prefix = f"$KV.{names.guard_bucket}."
    info = await js.stream_info(f"KV_{names.guard_bucket}", subjects_filter=f"{prefix}ban.>")
    out = []
    for subject in (info.state.subjects or {}).keys():
        with contextlib.suppress(Exception):  # deleted meanwhile
            entry = await kv.get(subject.removeprefix(prefix))
            ban = Ban.parse(entry.value or b"")
            if ban is not None and ban.remaining > 0:
                out.append(ban)
    return sorted(out, key=lambda b: b.until)


class Guard:
    def __init__(
        self, nc: Client, js: JetStreamContext, settings: Settings, names: Names, instance: str
    ) -> None:
        self._nc = nc
        self._js = js
        self._settings = settings
        self._names = names
        self.instance = instance
        self._kv: KeyValue | None = None
        self._stream = f"KV_{names.guard_bucket}"
        self._prefix = f"$KV.{names.guard_bucket}."
        self.bans: dict[str, Ban] = {}  # user key -> ban, as watched
        self.gateways: dict[str, float] = {}  # instance -> monotonic time its lease was seen
        self.held: dict[str, str] = {}  # slot key -> session id, this instance's
        self.letting_go: set[str] = set()  # slot keys whose release is under way
        self.on_ban: Callable[[Ban], None] = lambda ban: None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._announced: set[str] = set()  # bans acted on before a rewatch
        self.ready = False  # the bucket is open and watched (start, or the lease loop)
        self.warnings: dict[str, list[float]] = {}  # sub -> monotonic times of its warnings
        #: The slots watched: user key -> {"<instance>.<device>"}; ``slots_seen`` is the
        #: stream seq the watch has delivered up to, ``slots_caught_up`` that it has replayed
        #: what the bucket held (only then is the view whole).
        self.slots: dict[str, set[str]] = {}
        self.slots_seen = 0
        self.slots_caught_up = False
        self._slot_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self.slot_counts = {"watched": 0, "listed": 0}
        # The slots' JetStream calls, bounded like the claims' (ownership.OPENS_AT_ONCE):
        # a reconnect storm must not put thousands of requests in flight at once.
        self._gate = asyncio.Semaphore(OPENS_AT_ONCE)
        self._release_gate = asyncio.Semaphore(RELEASES_AT_ONCE)

    async def start(self) -> None:
        """Open the bucket, take the lease, watch; if JetStream cannot answer yet (a cluster
        without quorum, a bucket whose leader is being elected) the gateway starts anyway
        and the lease loop tries again every few seconds. Meanwhile handshakes get no slot
        and no ban is known (they could not be served without JetStream either)."""
        self.gateways[self.instance] = time.monotonic()
        try:
            await self._open()
        except Exception as exc:
            log.warning("the GUARD bucket is not ready (%s); trying again", exc)
        self._tasks = [asyncio.create_task(self._lease_loop())]

    async def _open(self) -> None:
        kv = await guard_bucket(self._js, self._settings, self._names)
        self._kv = kv
        await self._renew()
        self._watchers = await self._start_watching()
        self.ready = True

    async def _start_watching(self) -> list[asyncio.Task[None]]:
        assert self._kv is not None
        bans = await self._kv.watch("ban.>")
        leases = await self._kv.watch("gw.>")
        self.slots, self.slots_seen, self.slots_caught_up = {}, 0, False
        slots = await self._kv.watch("conn.>")
        return [
            asyncio.create_task(self._watch(bans, self._on_ban_entry)),
            asyncio.create_task(self._watch(leases, self._on_lease_entry)),
            asyncio.create_task(self._watch(slots, self._on_slot_entry)),
        ]

    async def rewatch(self) -> None:
        """After NATS came back: watch anew. The watchers' ordered consumers have no idle
        heartbeat to notice a restarted server by, and a ban missed then would hold on
        the other instances only. What is in the bucket comes again (a ban already known is
        not announced twice)."""
        if not self.ready:
            return  # the lease loop opens and watches it
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        # Bans lifted meanwhile are not replayed: start from what the bucket holds, and do
        # not announce again the ones already acted on.
        self._announced = set(self.bans)
        self.bans = {}
        self._watchers = await self._start_watching()

    async def stop(self) -> None:
        for task in self._tasks + self._watchers:
            task.cancel()
        for task in self._tasks + self._watchers:
            with contextlib.suppress(BaseException):
                await task
        if self.ready and self._kv is not None:  # a clean stop frees lease and slots at once
            with contextlib.suppress(Exception):
                await self._kv.delete(f"gw.{self.instance}")

    # ------------------------------------------------------------ watching
    @staticmethod
    async def _watch(watcher: Any, handle: Callable[[Any], None]) -> None:
        task = asyncio.current_task()
        while True:
            try:
                entry = await watcher.updates(timeout=3600)
            except TimeoutError:
                continue
            if task is not None and task.cancelling():
                # 3.11's wait_for (inside updates()) returns an entry that arrived with the
                # cancel instead of raising it: the slots watch, busy at every close, would
                # then wait out its hour at shutdown.
                raise asyncio.CancelledError
            handle(entry)  # None: what the bucket held has been replayed

    def _on_ban_entry(self, entry: Any) -> None:
        if entry is None:
            self._announced.clear()  # from here on a ban is new news
            return
        key = entry.key.removeprefix("ban.")
        ban = Ban.parse(entry.value or b"") if entry.operation is None else None
        if ban is None:
            lifted = self.bans.pop(key, None)
            if lifted is not None and lifted.remaining > 0:
                audit.warning(
                    "ban of %s lifted", lifted.sub, extra={"event": "ban_lifted", "sub": lifted.sub}
                )
            return
        fresh = key not in self.bans and key not in self._announced
        self.bans[key] = ban
        if fresh and ban.remaining > 0:
            audit.warning(
                "%s banned for %.0f s (%s, by %s)",
                ban.sub,
                ban.remaining,
                ban.reason,
                ban.by,
                extra={"event": "ban", "sub": ban.sub, "reason": ban.reason, "by": ban.by},
            )
            self.on_ban(ban)

    def _on_lease_entry(self, entry: Any) -> None:
        if entry is None:
            return
        instance = entry.key.removeprefix("gw.")
        if entry.operation is None:
            # As old as the server says (a watcher starting up gets the last lease of a
            # gateway that died just before): its lease runs from its write, not from now.
            created = entry.created  # a datetime (nats-py: the message's metadata)
            age = time.time() - created.timestamp() if created is not None else 0.0
            self.gateways[instance] = time.monotonic() - min(max(age, 0.0), LEASE_SECONDS)
        else:
            self.gateways.pop(instance, None)

    def _on_slot_entry(self, entry: Any) -> None:
        if entry is None:
            self.slots_caught_up = True
        else:
            parts = entry.key.split(".")
            if len(parts) == 4:  # conn.<user>.<instance>.<device>
                user, where = parts[1], f"{parts[2]}.{parts[3]}"
                if entry.operation is None:
                    self.slots.setdefault(user, set()).add(where)
                else:  # deleted or purged
                    held = self.slots.get(user)
                    if held is not None:
                        held.discard(where)
                        if not held:
                            del self.slots[user]
            self.slots_seen = max(self.slots_seen, entry.revision or 0)
        if self._slot_waiters and self.slots_caught_up:
            waiting = []
            for seq, fut in self._slot_waiters:
                if seq <= self.slots_seen:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    waiting.append((seq, fut))
            self._slot_waiters = waiting

    async def _watched_to(self, seq: int) -> bool:
        """The slots watch has replayed the bucket and delivered up to ``seq``: True at once
        or within SLOT_WATCH_SECONDS, else False."""
        if self.slots_caught_up and self.slots_seen >= seq:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append((seq, fut))
        try:
            async with asyncio.timeout(SLOT_WATCH_SECONDS):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            self._slot_waiters = [(s, f) for s, f in self._slot_waiters if f is not fut]

    def live(self, instance: str) -> bool:
        seen = self.gateways.get(instance)
        return instance == self.instance or (
            seen is not None and time.monotonic() - seen < LEASE_SECONDS
        )

    # ------------------------------------------------------------ bans
    def banned(self, sub: str) -> Ban | None:
        ban = self.bans.get(user_key(sub))
        return ban if ban is not None and ban.remaining > 0 else None

    async def warned(self, sub: str) -> Ban | None:
        """Count a rate_limit_warning sent to ``sub``; ban it (everywhere) at the limit."""
        now = time.monotonic()
        recent = [t for t in self.warnings.get(sub, []) if now - t < 60] + [now]
        self.warnings[sub] = recent
        if len(recent) < self._settings.ban_after_warnings or self.banned(sub):
            return None
        self.warnings.pop(sub, None)
        seconds = self._settings.ban_duration_minutes * 60
        reason = f"{len(recent)} rate_limit_warnings within a minute"
        return await add_ban(
            self._js, self._names, sub, seconds, reason, f"gateway {self.instance}"
        )

    # ------------------------------------------------------------ connection slots
    def _slot(self, sub: str, instance: str, client_id: str) -> str:
        return f"conn.{user_key(sub)}.{instance}.{device_key(client_id)}"

    async def admit(self, sub: str, client_id: str, session: str) -> str:
        """Take a connection slot for this device on this instance, or raise Refused."""
        ban = self.banned(sub)
        if ban is not None:
            raise Refused("banned", f"banned until {_iso(ban.until)}: {ban.reason}", ban.remaining)
        if not self._nc.is_connected:  # fail fast: the handshake cannot be served anyway
            raise NatsError("not connected to NATS")
        if not self.ready:
            raise NatsError("the GUARD bucket is not ready")
        slot = self._slot(sub, self.instance, client_id)
        value = orjson.dumps({"sub": sub, "client_id": client_id, "session": session})
        self.held[slot] = session  # before it exists: the sweep must not take it for a leak
        cap = self._settings.max_connections_per_user
        try:
            async with self._gate:
                ack = await self._js.publish(self._prefix + slot, value)
                count = -1
                if await self._watched_to(ack.seq):
                    count, dead = self._count_watched(sub, client_id)
                    self.slot_counts["watched"] += 1
                if not 0 <= count <= cap:  # not watched yet, or over: list them to be sure
                    count, dead = await self._count(sub, client_id)
                    self.slot_counts["listed"] += 1
        except BaseException:
            await self.release(slot, session)
            raise
        for stale in dead:
            self.spawn_purge(stale)
        if count > cap:
            await self.release(slot, session)
            raise Refused(
                "too_many_connections",
                f"{count - 1} connections of this user are open (at most {cap})",
                1.0,
            )
        return slot

    def _count_watched(self, sub: str, client_id: str) -> tuple[int, list[str]]:
        """:meth:`_count` from the slots watched. It may count a slot whose removal it did
        not see (a purge by an older version): never fewer than the bucket holds."""
        user = user_key(sub)
        held = self.slots.get(user, ())
        return self._tally((f"{self._prefix}conn.{user}.{where}" for where in held), client_id)

    async def _count(self, sub: str, client_id: str) -> tuple[int, list[str]]:
        """:meth:`_tally` of the user's slots as the stream lists them."""
        pattern = f"{self._prefix}conn.{user_key(sub)}.>"
        info = await self._js.stream_info(self._stream, subjects_filter=pattern)
        return self._tally((info.state.subjects or {}).keys(), client_id)

    def _tally(self, subjects: Iterable[str], client_id: str) -> tuple[int, list[str]]:
        """Of a user's slot subjects: the connections on live instances, this device's own
        slot elsewhere not counted (it is being taken over), this one counted; and the
        slots of dead instances."""
        own = device_key(client_id)
        count, dead = 0, []
        for subject in subjects:
            _, _, instance, device = subject.removeprefix(self._prefix).split(".")
            if not self.live(instance):
                dead.append(subject)
            elif instance == self.instance or device != own:
                count += 1
        return count, dead

    async def release(self, slot: str, session: str) -> None:
        """Give the slot back (if this session still holds it: a newer connection of the
        device on this instance may have taken it over)."""
        if self.held.get(slot) != session:
            return
        del self.held[slot]
        self.letting_go.add(slot)  # the sweep leaves it to this release
        try:
            with contextlib.suppress(Exception):
                async with self._release_gate:
                    await self._purge(self._prefix + slot)
        finally:
            self.letting_go.discard(slot)

    async def _purge(self, subject: str) -> None:
        """Remove a slot: a purge marker (the slot's messages go, and every watch sees it),
        itself gone after SLOT_MARKER_SECONDS."""
        headers = {KV_OP: KV_PURGE, Header.ROLLUP: MSG_ROLLUP_SUBJECT}
        await self._js.publish(subject, b"", headers=headers, msg_ttl=SLOT_MARKER_SECONDS)

    def spawn_purge(self, subject: str) -> None:
        async def purge() -> None:
            with contextlib.suppress(Exception):
                await self._purge(subject)

        self._tasks.append(asyncio.create_task(purge()))

    # ------------------------------------------------------------ the lease
    async def _renew(self) -> None:
        await self._js.publish(
            f"{self._prefix}gw.{self.instance}", b"{}", msg_ttl=math.ceil(LEASE_SECONDS)
        )

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE_SECONDS / 3)
            try:
                if not self.ready:
                    await self._open()
                    log.info("the GUARD bucket is ready: bans and connection slots hold")
                await self._renew()
                await self._sweep_own()
            except Exception as exc:  # NATS away: the lease lapses, the slots count no more
                log.warning("gateway lease not renewed: %s", exc)
            self._tasks = [t for t in self._tasks if not t.done()]
            now = time.monotonic()  # forget users whose warnings are a minute old
            self.warnings = {u: ts for u, ts in self.warnings.items() if now - ts[-1] < 60}

    async def _sweep_own(self) -> None:
        """Purge this instance's slots that no open connection holds (a release that failed
        while NATS was away). From the slots watched once the watch has replayed the bucket
        (a listing would also show the purge markers of the last second's releases, and
        purge them again), else from a listing."""
        if self.slots_caught_up:
            mine = f"{self.instance}."
            subjects = [
                f"{self._prefix}conn.{user}.{where}"
                for user, held in self.slots.items()
                for where in held
                if where.startswith(mine)
            ]
        else:
            pattern = f"{self._prefix}conn.*.{self.instance}.*"
            info = await self._js.stream_info(self._stream, subjects_filter=pattern)
            subjects = list((info.state.subjects or {}).keys())
        for subject in subjects:
            key = subject.removeprefix(self._prefix)
            if key not in self.held and key not in self.letting_go:
                self.spawn_purge(subject)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
