"""One WebSocket connection of one device: backlog first, then live, acks to JetStream.

Two modes. ``catchup``: alerts come from the device's durable consumer (its offline queue)
while live alerts offered meanwhile are buffered. ``live``: alerts come from the gateway's
shared feed. The switch to live happens when the durable reports nothing pending and has
read up to where the buffer starts; the buffer then holds every later alert, so nothing
falls between (docs/architecture.md).
A full window sends the session back to ``catchup``: the durable keeps what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from aiohttp import WSMsgType, web
from nats.errors import TimeoutError as NatsTimeout

from tocsin.core.naming import MSG_ID_HEADER, matches
from tocsin.schemas import Alert, BacklogSuperseded, Close, ConnectionStats, Error, ErrorCode
from tocsin.schemas.subscription import Subscription

from .device import Device, Position, Record, checkpoint_due, record_due
from .events import Event
from .limits import RateLimit, TokenBucket
from .live import PING_FRAME, LiveAlert, alert_frame, expires_of, text_frame
from .ownership import Claim, Lost, Suspended
from .queue import RECORD_SECONDS
from .window import InFlight, Window

if TYPE_CHECKING:
    from .context import Gateway

log = logging.getLogger(__name__)

#: Live alerts a catching-up session buffers before it relies on the durable instead.
BUFFER_LIMIT = 10_000
#: Live alerts a live session holds while its window is full, before it falls back to
#: reading its durable. A burst larger than the window then costs no JetStream reads (the
#: alerts are shared objects: a pointer each); only a device this far behind re-reads.
WAITING_LIMIT = 1_000
#: A session's queues before their first use (``Session.waiting``, ``out``, ``written_js``).
NO_QUEUE: Any = ()
#: The WebSocket ping the ticker queues beside the protocol's ``ping`` frame (no payload).
WS_PING = (-1, b"")
PING = WSMsgType.PING
#: A closing handshake (close frame out, the client's back) may take this long, capped at
#: one heartbeat; then the socket is aborted. Nothing of the device waits for it.
CLOSE_SECONDS = 5.0
#: A session's next visit by the ticker is at least this far ahead.
TICK_MIN_SECONDS = 0.05
#: The same, for a peer found silent or not reading (4000, 4008).
DEAD_CLOSE_SECONDS = 0.2


def _as_id(text: str) -> int | str:
    """An alert_id from its Nats-Msg-Id: the integer ids were integers in the alert."""
    return int(text) if text.isdigit() and text[0] != "0" else text


class Mode(enum.StrEnum):
    CATCHUP = "catchup"
    LIVE = "live"


class Session:
    #: Slots, not a dict: ~1.1 KiB less per connection (59 attributes: the dict took
    #: 1,584 bytes), and the hot paths' attribute reads a little faster.
    __slots__ = (
        "_written_seen",
        "acks",
        "answered_ts",
        "appended",
        "buffer",
        "buffer_overflow",
        "catchup_task",
        "claim",
        "claims_regions",
        "closing",
        "consumer",
        "corked",
        "countries",
        "device",
        "direct",
        "established_at",
        "failed",
        "filters",
        "finished",
        "frames_written",
        "gw",
        "high_water",
        "id",
        "last_heard",
        "latency_ms",
        "limit",
        "live_since",
        "mode",
        "next_checkpoint",
        "next_ping",
        "next_record",
        "next_sweep",
        "next_touch",
        "out",
        "ping_ts",
        "previous_ping_ts",
        "progress_at",
        "queue_at_floor",
        "queue_lock",
        "queue_reads",
        "rate_limit_warnings",
        "recorded_at",
        "recorded_floor",
        "redelivered",
        "rewind",
        "room_ready",
        "saved_floor",
        "sender_task",
        "sent",
        "started",
        "stopped",
        "subscription",
        "track",
        "transport",
        "waiting",
        "whole_countries",
        "window",
        "writing",
        "written_js",
        "ws",
        "ws_pongs",
    )

    def __init__(
        self,
        gw: Gateway,
        ws: web.WebSocketResponse,
        device: Device,
        transport: asyncio.BaseTransport | None = None,
    ) -> None:
        self.gw = gw
        self.ws = ws
        self.transport = transport  # the socket under ``ws``: aborted if closing it stalls
        self.device = device
        self.id = uuid.uuid4().hex
        self.claim: Claim | None = None  # ownership of the device (ownership.py)
        self.stopped = Event()  # close() was called: the handler unwinds
        self.finished: asyncio.Event = Event()  # let go of the device: acts no more
        regions = self.claims_regions = device.claims.receivable_regions()
        self.filters = gw.names.region_filters(regions)  # the token's bound, for the live feed
        self.subscription = Subscription()  # the device's, once its queue is opened
        self.queue_lock = asyncio.Lock()  # a subscription change waits for a backlog read
        self.rewind = False  # the queue's filters changed while reading it: read it again
        self.countries = None if regions is None else frozenset(r[:2] for r in regions)
        self.whole_countries = regions is None or all(len(r) == 2 for r in regions)
        self.consumer = gw.names.device_consumer(device.user_id, device.client_id)
        self.track = device.ack_mode == "client"
        self.mode = Mode.CATCHUP
        self.window = Window(gw.settings.max_inflight)
        self.buffer: list[LiveAlert] = []
        #: Live, not yet judged: the window was full. This and the other queues below start
        #: as an empty tuple and become deques when first used (an empty deque is 760
        #: bytes, and most connections never queue anything: frames go straight out).
        self.waiting: deque[LiveAlert] = NO_QUEUE
        self.buffer_overflow = False
        # The device's position (device.Position) lives in the window (floor, next seq)
        # and here, as plain ints for the hot paths; resume() sets them, position reads them.
        self.saved_floor = 0  # the floor JetStream knows
        self.high_water = 0  # highest seq sent to this device, by any of its connections
        self.queue_at_floor = False  # see resume()
        self.queue_reads = 0
        self.out: deque[tuple[int, bytes]] = NO_QUEUE  # for the sender, in order
        #: seq -> (when ALERTS stored it, live): timed when its first frame is written.
        self.appended: dict[int, tuple[float, bool]] = {}
        self.written_js: deque[tuple[int, Any]] = NO_QUEUE  # ack_mode=auto, see _ack_written
        #: The sender: a task only while frames wait for it (``_wake_sender``).
        self.sender_task: asyncio.Task[None] | None = None
        self.failed: BaseException | None = None  # the sender or catch-up task failed: serve()
        self.room_ready: asyncio.Event = Event()
        #: The catch-up task: it runs while the session is in catchup mode (and for a live
        #: queue's touch), then ends; ``start_catchup`` starts it again.
        self.catchup_task: asyncio.Task[None] | None = None
        self.closing: tuple[int, str] | None = None
        #: Frames may be written straight to the socket by whoever sends them (the live
        #: feed's dispatch above all) instead of waking the sender: not compressed (the
        #: deflate context is aiohttp's writer's), acks by the client (with ack_mode=auto
        #: a write settles the window and JetStream acks follow it: the sender's work).
        self.direct = transport is not None and self.track and not ws.compress
        self.corked: list[bytes] = []  # whole frames, written at the end of this pass
        self.frames_written = 0
        self.writing = False  # the sender waits for the socket to take a frame
        now = self.started = time.monotonic()
        self.progress_at = now  # the socket last took a frame, or had nothing to take
        self._written_seen = 0
        self.next_ping = now + gw.settings.heartbeat_seconds
        self.next_touch = now + self.touch_seconds  # the live queue's pull (start_catchup)
        self.last_heard = now  # any frame from the client: it is alive
        self.latency_ms: float | None = None
        # staggered: sessions that connected together do not all save at the same tick.
        # Meanwhile the journal (journal.py) holds the floor, every checkpoint interval.
        self.next_checkpoint = now + random.uniform(0, gw.settings.queue_save_seconds)
        #: The ticker's next visit (context.py): soon while alerts are in flight, else at
        #: the session's next deadline (next_visit).
        self.next_sweep = now + random.random()
        self.next_record = now + RECORD_SECONDS  # the record was written at connect
        self.recorded_floor = -1  # the floor the device's record holds (resume() sets it)
        self.recorded_at = now
        self.sent = self.redelivered = self.acks = self.rate_limit_warnings = 0
        self.ws_pongs = 0  # answers to the WebSocket pings
        self.limit = RateLimit(
            TokenBucket(gw.settings.max_messages_per_minute, gw.settings.rate_limit_burst)
        )
        self.ping_ts: float | None = None  # the ts of the last ping sent
        self.previous_ping_ts: float | None = None
        self.answered_ts: float | None = None  # the newest ping ts a pong carried back
        self.live_since: float | None = None  # monotonic: the first switch to live
        self.established_at = now  # connection_established queued (established())

    # ------------------------------------------------------------ called by the feed
    def accepts(self, subject: str) -> bool:
        # The feed offers alerts by country already: whole-country tokens need no more.
        return self.whole_countries or any(matches(subject, f) for f in self.filters)

    def offer(self, alert: LiveAlert) -> None:
        if self.mode is Mode.CATCHUP:
            if len(self.buffer) >= BUFFER_LIMIT:
                self.buffer.clear()
                self.buffer_overflow = True
            elif not self.buffer_overflow:
                self.buffer.append(alert)
            return
        if self.waiting or not self._try_live(alert):
            if len(self.waiting) >= WAITING_LIMIT:
                self._fall_behind(alert)
            else:
                if not self.waiting:
                    self.waiting = deque()
                self.waiting.append(alert)  # sent in order as acks make room

    def _try_live(self, alert: LiveAlert) -> bool:
        """Judge and send a live alert; False when the window has no room for it."""
        if not self.window.is_new(alert.seq):
            return True
        if self._room() <= 0:
            return False
        if self._judge(alert.seq, alert.data, alert.expires, alert):
            self._send_live(alert)
        return True

    def _send_live(self, alert: LiveAlert) -> None:
        """Send an alert of the live feed (its frames built once per gateway)."""
        self._send_new(
            alert.seq,
            alert.data,
            alert.expires,
            alert.frame,
            appended=alert.appended,
            wire=alert.wire,
        )

    def _release(self) -> None:
        """Room in the window: send the live alerts that waited for it, in order."""
        while self.waiting and self.mode is Mode.LIVE and self._try_live(self.waiting[0]):
            self.waiting.popleft()

    def _judge(
        self,
        seq: int,
        data: bytes,
        expires: float | None,
        live: LiveAlert | None = None,
        subject: str | None = None,
    ) -> bool:
        """Decide once whether an alert not yet judged for this device is to be sent; if not,
        pass over it. A backlog alert (``subject`` given) is first held against this
        connection's own token: the queue's filters may be wider (set by another token of
        the device); live alerts were, by the feed (``accepts``)."""
        if (
            (expires is not None and expires <= time.time())
            or (subject is not None and not self.bound(subject))
            or not self._wanted(data, live)
        ):
            self._pass_over(seq)
            return False
        return True

    def bound(self, subject: str) -> bool:
        """The connection's token allows the alert of ``subject``."""
        return self.countries is None or any(matches(subject, f) for f in self.filters)

    def _wanted(self, data: bytes, live: LiveAlert | None = None) -> bool:
        """The fine filter: the subscription judges every alert before it is sent."""
        if self.subscription.everything:
            return True  # the token's regions were checked on the subject already (bound)
        try:
            parsed = live.parsed() if live is not None else Alert.model_validate_json(data)
        except ValueError:
            log.warning("%s: stored alert does not parse; delivered unfiltered", self.consumer)
            return True
        return self.subscription.matches(parsed, self.claims_regions)

    def _pass_over(self, seq: int) -> None:
        """Never send ``seq`` to this device (expired or not subscribed); it settles like an
        ack. With ack_mode=auto only once the sender has written what came before it."""
        if self.track:
            self.window.skip(seq)
        else:
            self.window.skip(seq, settle=False)
            self._enqueue(seq, b"")

    # ------------------------------------------------------------ sending
    def _room(self) -> int:
        used = len(self.window.items) if self.track else len(self.out)
        return self.window.capacity - used

    def _send_new(
        self,
        seq: int,
        data: bytes,
        expires: float | None,
        frame: bytes | None,
        js_msg: Any = None,
        appended: float = 0.0,
        live: bool = True,
        wire: bytes = b"",
    ) -> None:
        now = time.monotonic()
        item = InFlight(seq, data, expires, now, js_msg)
        self.window.take(item, self.track)
        if self._room() <= 0 and self.next_sweep > now + self.gw.sweep and self in self.gw.sessions:
            # The window is full: the ticker watches it closely again (a client holding it
            # full, or not reading; Session.next_visit). Not for every delivery: a visit
            # of each device after each broadcast was most of the ticker's work.
            self.gw.sessions.schedule(self, now + self.gw.sweep)
        redelivered = seq <= self.high_water
        if redelivered:
            self.redelivered += 1
            frame, wire = alert_frame(seq, data, True), b""
        else:
            self.high_water = seq
            if not frame:
                frame = alert_frame(seq, data, False)
        if not self.out and self._write_now(wire or text_frame(frame)):
            self.frames_written += 1
            self.sent += 1
            if appended:
                self.gw.sessions.corked_alert(live, appended)
            return
        if appended:
            self.appended[seq] = (appended, live)
        self._enqueue(seq, frame)

    def _write_now(self, wire: bytes) -> bool:
        """Write a whole WebSocket frame to the socket, ahead of the sender, if it may go:
        nothing queued for the sender (the caller checks ``out``) and nothing being written
        (order), the socket not behind (its transport buffers nothing: the kernel took all
        so far, so a client that stops reading sends everything through the sender, whose
        writes wait for the socket), the device usable (NATS lost: nothing is sent), the
        session not closing. False: the caller queues the frame for the sender instead.

        The frame is corked: the frames a session is given in one pass of the event loop
        (a burst read from NATS in one go is dispatched in one pass) go out in one write
        at the end of it (Sessions.cork), not one system call each. Whatever is queued for
        the sender after them waits for that write (``_uncork`` first, here and in
        ``_enqueue``): corked frames are always older than queued ones."""
        transport = cast("asyncio.Transport", self.transport)  # direct: not None
        claim = self.claim
        if (
            not self.direct
            or self.writing
            or self.closing is not None
            or claim is None
            or not claim.usable.is_set()
            or self.ws.closed
            or transport.is_closing()
            or transport.get_write_buffer_size()
        ):
            if self.corked:
                self.uncork()
            return False
        if not self.corked:
            self.gw.sessions.cork(self)
        self.corked.append(wire)
        return True

    def uncork(self) -> None:
        """Write the corked frames (one write), unless the socket is gone already (then
        they are lost as the sender's queue is: the device has them again on reconnect,
        unacked)."""
        corked, self.corked = self.corked, []
        transport = cast("asyncio.Transport", self.transport)
        # Never after a close frame: ws.closed is set before aiohttp writes it.
        if corked and not self.ws.closed and not transport.is_closing():
            transport.write(corked[0] if len(corked) == 1 else b"".join(corked))

    def _enqueue(self, seq: int, frame: bytes) -> None:
        if self.corked:
            self.uncork()
        if not self.out:
            self.out = deque()
        self.out.append((seq, frame))
        self._wake_sender()

    def _queue_first(self, *frames: tuple[int, bytes]) -> None:
        """Put ``frames`` ahead of everything queued for the sender (a ping), in order."""
        if self.corked:
            self.uncork()
        if not self.out:
            self.out = deque()
        self.out.extendleft(reversed(frames))
        self._wake_sender()

    def _wake_sender(self) -> None:
        """Frames are queued: start the sender unless it runs. It ends once the queue is
        empty (most connections never need it: their frames go straight to the socket), and
        never starts once the session is stopping (its handler cancels what runs)."""
        if self.sender_task is None and not self.stopped.is_set() and self.claim is not None:
            task = self.sender_task = asyncio.get_running_loop().create_task(self.sender())
            task.add_done_callback(self.task_done)

    def task_done(self, task: asyncio.Future[Any]) -> None:
        """The sender or the catch-up task ended: if by an error, the session stops and
        serve() raises it (the session ends with 1011 or 4503)."""
        if self.sender_task is task:
            self.sender_task = None
        if self.catchup_task is task:
            self.catchup_task = None
        if not task.cancelled() and task.exception() is not None and self.failed is None:
            self.failed = task.exception()
            self.stopped.set()

    def send_control(self, frame: Any) -> None:
        data = frame.model_dump_json().encode()
        if not self.out and self._write_now(text_frame(data)):
            self.frames_written += 1
            return
        self._enqueue(0, data)

    def _fall_behind(self, alert: LiveAlert) -> None:
        """Too far behind: stop live delivery; the durable has everything after the floor."""
        self.mode = Mode.CATCHUP
        self.buffer = [*self.waiting, alert]
        self.waiting = NO_QUEUE
        self.buffer_overflow = False
        self.start_catchup()

    async def sender(self) -> None:
        """Write what is queued, in order, then end (``_wake_sender`` starts it again)."""
        assert self.claim is not None
        usable = self.claim.usable
        while self.out and not self.stopped.is_set():  # a swallowed cancel ends here too
            while self.out:
                if not usable.is_set():  # NATS lost: nothing is sent until the device is
                    await usable.wait()  # reclaimed (if it is lost, the session ends)
                seq, frame = self.out.popleft()
                if frame or seq < 0:  # empty: a passed-over seq (ack_mode=auto), settled in turn
                    self.writing = True
                    try:
                        await self.ws.send_frame(frame, WSMsgType.TEXT if seq >= 0 else PING)
                    except ConnectionError:  # the client went away: the session ends
                        self.stopped.set()
                        return
                    finally:
                        self.writing = False
                    self.frames_written += 1
                if seq > 0:
                    self.sent += bool(frame)
                    timed = self.appended.pop(seq, None)
                    if timed is not None and frame:
                        self.gw.sessions.timings.delivered(timed[1], timed[0], time.time())
                    if not self.track:  # ack_mode=auto: written to the socket = delivered
                        self.window.ack(seq)
                        self.room_ready.set()
            if self.waiting:
                self._release()
            if self.written_js:
                await self._ack_written()
        if self.sender_task is asyncio.current_task():
            self.sender_task = None  # no await since the queue was found empty: none missed
            self.out = NO_QUEUE

    async def _ack_written(self) -> None:
        """ack_mode=auto: tell JetStream about backlog alerts now written to the socket."""
        newest = None
        while self.written_js and self.written_js[0][0] <= self.window.floor:
            newest = self.written_js.popleft()
        if newest is not None and self.mode is Mode.CATCHUP:
            self._act()
            await newest[1].ack()  # AckAll
            self.saved_floor = max(self.saved_floor, newest[0])

    # ------------------------------------------------------------ backlog
    def start_catchup(self, pending: int | None = None, touch: bool = False) -> None:
        """Start the catch-up task unless it runs. It reads the queue while the session is
        in catchup mode, then ends: a task only while catching up (about a kilobyte per
        connection less than one waiting for the next fall behind), as the sender is one
        only while frames wait. ``pending``: the backlog found when the connection opened
        (None: unknown; the queue is reset to the floor first). ``touch``: a live session's
        queue is pulled once (:meth:`_touch`), by the ticker's call every ``touch_seconds``."""
        if self.stopped.is_set() or (self.catchup_task and not self.catchup_task.done()):
            return  # a running task reads on while the mode is catchup: nothing is missed
        task = asyncio.get_running_loop().create_task(self.catchup(pending, touch))
        self.catchup_task = task
        task.add_done_callback(self.task_done)  # its failure stops the session

    async def catchup(self, pending: int | None, touch: bool = False) -> None:
        """The catch-up task (:meth:`start_catchup`)."""
        reader = None

        def read(reader: Any, before: int) -> None:
            if reader.delivered != before:  # JetStream delivered: it may be past the floor
                self.queue_at_floor = False
                self.queue_reads += 1

        try:
            if touch:
                self._act()
                reader = await self.gw.queues.reader(self.consumer)
                before = reader.delivered
                try:
                    await self._touch(reader)
                finally:
                    read(reader, before)
                reader = await self._let_go(reader)
            # The mode is read again after every await: a session that fell behind while
            # this task was ending (no new task started: this one ran) is read on here.
            while self.mode is Mode.CATCHUP and not self.stopped.is_set():
                if pending is None:
                    pending = await self.checkpoint()
                if reader is None:
                    self._act()
                    reader = await self.gw.queues.reader(self.consumer)
                before = reader.delivered
                try:
                    await self._drain(reader, pending)
                finally:
                    read(reader, before)
                pending = None  # a later pass asks JetStream again, after a reset
                reader = await self._let_go(reader)
        finally:
            if reader is not None:
                with contextlib.suppress(Exception):
                    await reader.unsubscribe()
            if self.catchup_task is asyncio.current_task():
                # No await since the mode was found live: a fall behind from here starts
                # a new task.
                self.catchup_task = None
                self.next_touch = time.monotonic() + self.touch_seconds

    async def _let_go(self, reader: Any) -> Any:
        """A live session keeps no subscription to its queue (a nats-py subscription with
        its queue, and one more subscription in nats-server, per device): the reader is
        bound again, without a JetStream call, the next time the queue is read."""
        if self.mode is not Mode.LIVE:
            return reader
        with contextlib.suppress(Exception):
            await reader.unsubscribe()
        return None

    @property
    def touch_seconds(self) -> float:
        """JetStream reaps a consumer after ``inactive_threshold`` without pulls or acks, and
        a live device's queue sees neither: pull once well before that (``next_touch``)."""
        return self.gw.settings.retention_seconds / 4

    async def _touch(self, reader: Any) -> None:
        try:
            self._act()
            msgs = await reader.fetch(1, timeout=1.0)
        except (TimeoutError, NatsTimeout):
            return
        for msg in msgs:  # an alert already sent, or the next one in order
            await self._from_backlog(msg, msg.metadata.sequence.stream)

    async def _drain(self, reader: Any, pending: int | None) -> None:
        """Read the queue until it is empty, then go live. ``pending`` is what JetStream last
        said is left (None: unknown); asking for no more than that keeps a fetch from waiting
        out its timeout for alerts that do not exist. Nothing pending is not enough to go
        live: the queue's node must also have given everything up to ``live_from``, after
        which the buffer holds every live alert (a node back from a restart reports
        nothing pending before it has caught up with the stream)."""
        live_from = self.gw.feed.last_seq  # buffered from here on, or from before
        while self.mode is Mode.CATCHUP and not self.stopped.is_set():
            if self.rewind:  # the subscription changed: read on under the new filters
                async with self.queue_lock:
                    self.rewind = False
                    pending = await self.checkpoint()
            if pending == 0:
                async with self.queue_lock:  # a subscription change waits for the switch
                    if not self.rewind and await self.gw.queues.read_through(
                        self.consumer, live_from, self._act
                    ):
                        self._try_go_live()
                        live_from = self.gw.feed.last_seq  # not live: buffered from here
                pending = None  # still catching up: ask JetStream again
                continue
            room = self._room()
            if room <= 0:
                self.room_ready.clear()
                await self.room_ready.wait()
                continue
            async with self.queue_lock:  # judged under the filters the queue was read with
                if self.rewind:
                    continue
                try:
                    self._act()
                    msgs = await reader.fetch(min(room, pending or room), timeout=2.0)
                except (TimeoutError, NatsTimeout):
                    msgs = []
                for msg in msgs:
                    meta = msg.metadata
                    pending = meta.num_pending
                    await self._from_backlog(msg, meta.sequence.stream)
                if not msgs:
                    self._act()
                    pending = await self.gw.queues.pending(self.consumer)

    async def _from_backlog(self, msg: Any, seq: int) -> None:
        if seq <= self.window.floor:
            self._act()
            await msg.ack()  # the device acked it already (it went out live): tell JetStream
            self.saved_floor = max(self.saved_floor, seq)
        elif seq < self.window.next_seq:
            item = self.window.items.get(seq)
            if item is not None:
                item.js_msg = msg  # so that the device's ack of it reaches JetStream
            elif not self.track:
                self._written_js((seq, msg))  # queued, not yet written: ack after
        else:
            expires = expires_of(msg.headers)
            sent = not self._superseded(msg, seq) and self._judge(
                seq, msg.data, expires, subject=msg.subject
            )
            if sent:
                stored = msg.metadata.timestamp.timestamp()
                self._send_new(seq, msg.data, expires, None, msg, stored, live=False)
            if not self.track:
                self._written_js((seq, msg))  # acked once written (or passed over)
            elif not sent and self.window.floor >= seq:
                self._act()
                await msg.ack()  # passed over with nothing unacked before it: settled
                self.saved_floor = max(self.saved_floor, seq)

    def _written_js(self, entry: tuple[int, Any]) -> None:
        if not self.written_js:
            self.written_js = deque()
        self.written_js.append(entry)

    def _superseded(self, msg: Any, seq: int) -> bool:
        """A later update or cancel in the stream replaced this backlog alert: pass over it
        and say so (``backlog_superseded``); the superseder comes later in the backlog, or
        live. One dict look-up on the alert's Nats-Msg-Id (its id) per backlog alert."""
        alert_id = (msg.headers or {}).get(MSG_ID_HEADER)
        by = self.gw.supersessions.superseder(alert_id, seq) if alert_id else None
        if alert_id is None or by is None:
            return False
        if not self.bound(msg.subject) or not self._wanted(msg.data):
            return False  # not this device's anyway: _judge passes over it, unannounced
        self._pass_over(seq)
        self.gw.sessions.totals.superseded += 1
        self.send_control(BacklogSuperseded(alert_id=_as_id(alert_id), superseded_by=_as_id(by)))
        return True

    def _try_go_live(self) -> None:
        if self.buffer_overflow:
            self.buffer_overflow = False
            self.buffer.clear()
            return  # what was not buffered is in the durable: read on
        fresh = [a for a in self.buffer if self.window.is_new(a.seq)]
        if len(fresh) > self._room():
            self.buffer.clear()
            return
        self.buffer.clear()
        for alert in fresh:
            if self._judge(alert.seq, alert.data, alert.expires, alert):
                self._send_live(alert)
        self.mode = Mode.LIVE
        if self.live_since is None:
            self.live_since = time.monotonic()
            self.gw.sessions.timings.catchup.observe(self.live_since - self.established_at)

    # ------------------------------------------------------------ acks and timers
    async def on_ack(self, seq: int) -> None:
        held = self.ack(seq)
        if held is not None:
            await self.ack_queue(held)

    def ack(self, seq: int) -> InFlight | None:
        """A client's ack, applied at once (no await: the receive loop calls it for every
        ack frame without a coroutine of its own). Returns the newest backlog item it
        covers when JetStream is to hear of it (:meth:`ack_queue`), else None."""
        if seq >= self.window.next_seq:
            self.send_control(
                Error(
                    code=ErrorCode.INVALID_ACK, detail=f"seq: {seq} was not sent on this connection"
                )
            )
            return None
        if not self.track:
            return None
        self.acks += 1
        done = self.window.ack(seq)
        self.room_ready.set()
        if self.waiting:
            self._release()
        if done and self.mode is Mode.CATCHUP and self.owning:
            for item in reversed(done):
                if item.js_msg is not None:
                    return item
        return None

    async def ack_queue(self, item: InFlight) -> None:
        await item.js_msg.ack()  # AckAll: JetStream's floor follows the device's
        self.saved_floor = max(self.saved_floor, item.seq)

    def established(self) -> None:
        """The handshake is done: heartbeats count from here. Opening the queue may take
        seconds (a busy NATS, a queue rebuilt after a node loss) and no ping could be sent
        meanwhile, so that time is not the client's silence."""
        now = self.established_at = time.monotonic()
        self.next_ping = now + self.gw.settings.heartbeat_seconds
        self.last_heard = max(self.last_heard, now)

    def tick(self, now_mono: float, now: float, late: float = 0.0) -> None:
        """Called by the gateway's ticker: heartbeats, token expiry, a window held full. ``late`` is
        how long the ticker's own loop was stalled: that much silence is not the client's."""
        if self.closing:
            return
        if now >= self.device.claims.exp:
            self.close(Close.TOKEN_EXPIRED, "token expired")
            return
        hb = self.gw.settings.heartbeat_seconds
        if now_mono - self.last_heard > 2 * hb + late:
            self.close(Close.HEARTBEAT_TIMEOUT, "nothing from the client for two heartbeats")
            return
        if self.frames_written != self._written_seen or not self.writing:
            self._written_seen, self.progress_at = self.frames_written, now_mono
        elif now_mono - self.progress_at > 2 * hb + late:
            # The client sends but does not read: its socket took no frame for two heartbeats.
            self.close(Close.SLOW_CLIENT, "the client does not read its socket")
            return
        if now_mono >= self.next_ping:
            self.next_ping = now_mono + hb
            # Ahead of queued alerts: behind a burst, a ping would arrive late and its pong
            # later still, closing a client that is only busy. Two pings: the protocol's
            # (its pong carries the latency) and a WebSocket one, answered by the client's
            # WebSocket stack (a browser's, even while the page's scripts are throttled):
            # either answer shows the link is alive.
            ping = b'{"type":"ping","ts":%r}' % now
            self.previous_ping_ts, self.ping_ts = self.ping_ts, now
            if not self.out and self._write_now(PING_FRAME + text_frame(ping)):
                self.frames_written += 2
            else:
                self._queue_first(WS_PING, (0, ping))
        if now_mono >= self.next_touch and self.mode is Mode.LIVE and self.catchup_task is None:
            self.next_touch = now_mono + self.touch_seconds  # again after the task, if it runs
            self.start_catchup(touch=True)
        if self.window.items:
            self.window.drop_expired(now)
            if self.waiting:
                self._release()
            # Nothing is resent on an open connection (TCP delivers or breaks): a client
            # that holds the whole window unacked is closed, reconnects, and gets what it
            # did not ack again, flagged, from its queue.
            timeout = self.gw.settings.ack_timeout_seconds
            if self.window.held_full(now_mono, timeout + late):
                self.close(
                    Close.ACK_TIMEOUT,
                    f"{len(self.window.items)} alerts unacked for {timeout:g} s (window full)",
                )

    def next_visit(self, now_mono: float, now: float) -> float:
        """When the ticker must see this session again. While anything is in flight, queued
        or being written: after one sweep (a window held full, a client that stopped
        reading). Otherwise at its next deadline: a ping, two silent heartbeats, the
        token's expiry, the queue's touch, a save or record write due. An idle device costs
        a visit per heartbeat, not one per second; a delivery brings the visit forward only
        when it fills the window (_send_new): a client that stops reading is seen at its
        next visit at the latest, then watched every sweep."""
        sweep = self.gw.sweep
        if self.window.items or self.waiting or self.out or self.writing or self.closing:
            return now_mono + sweep
        hb = self.gw.settings.heartbeat_seconds
        due = min(
            self.next_ping,
            self.last_heard + 2 * hb,
            now_mono + (self.device.claims.exp - now),
            self.next_touch,
        )
        if self.needs_checkpoint():
            due = min(due, self.next_checkpoint)
        if self.owning:
            quiet = self.recorded_at + self.gw.settings.retention_seconds / 4
            due = min(due, self.next_record if self.dirty_record else max(self.next_record, quiet))
        return max(due, now_mono + TICK_MIN_SECONDS)

    @property
    def dirty_record(self) -> bool:
        return self.window.floor != self.recorded_floor

    def checkpoint_planned(self, now_mono: float) -> None:
        """The queue of a live device is reset to its floor no sooner than
        ``TOCSIN_QUEUE_SAVE_SECONDS`` from now; the journal holds the floor meanwhile."""
        self.next_checkpoint = now_mono + self.gw.settings.queue_save_seconds

    @property
    def journal_floor(self) -> int | None:
        """The floor for the journal: the device acked past what its queue knows."""
        if self.window.floor > self.saved_floor and self.owning:
            return self.window.floor
        return None

    def on_pong(self, ts: float | None) -> None:
        if ts is None:  # a bare pong answers the latest ping
            self.answered_ts = self.ping_ts
            return
        self.latency_ms = max(0.0, (time.time() - ts) * 1000)
        if ts == self.ping_ts or ts == self.previous_ping_ts:
            self.answered_ts = max(self.answered_ts or ts, ts)

    def healthy(self, now_mono: float) -> bool:
        """It answered its last ping, or that one is younger than a heartbeat and it
        answered the one before (no ping yet: a new connection is healthy)."""
        if self.ping_ts is None or self.answered_ts == self.ping_ts:
            return True
        fresh = now_mono < self.next_ping  # the last ping went out less than a heartbeat ago
        return fresh and (
            self.previous_ping_ts is None or self.answered_ts == self.previous_ping_ts
        )

    async def resubscribe(self, subscription: Subscription) -> None:
        """Make ``subscription`` the device's: persisted with its queue's subject filters, then
        judging every alert from here on, live or from the backlog."""
        async with self.queue_lock:
            self._act()
            await self.gw.queues.subscribe(self.consumer, subscription, self.claims_regions)
            self.subscription = subscription
            if self.mode is Mode.CATCHUP:
                self.rewind = True

    def record_due(self, now_mono: float) -> bool:
        """Rewrite the record at most every RECORD_SECONDS, when device.record_due says so."""
        if now_mono < self.next_record or not self.owning:
            return False
        refresh = self.gw.settings.retention_seconds / 4
        return record_due(
            self.window.floor, self.recorded_floor, now_mono - self.recorded_at, refresh
        )

    # ------------------------------------------------------------ the device's position
    def resume(self, position: Position, subscription: Subscription) -> None:
        """Start from where the device's queue was opened: the queue and the record both
        hold ``position``'s floor, and the device was sent up to ``position.sent``."""
        self.subscription = subscription
        self.window.floor = self.saved_floor = self.recorded_floor = position.floor
        self.window.next_seq = position.next_seq
        self.high_water = position.sent
        #: JetStream confirmed the queue stands exactly at ``saved_floor`` (delivered nothing
        #: past it, holds nothing unacked), and it was not read since: as open() left it,
        #: or as a checkpoint of a live session did. Then a save at close that would move
        #: nothing is not made (handler._leave). ``queue_reads`` counts the reads that got
        #: messages (catchup).
        self.queue_at_floor = True
        self.queue_reads = 0

    @property
    def position(self) -> Position:
        return Position(self.window.floor, self.high_water)

    def current_record(self) -> Record:
        """The device's record as this session knows it. Its floor never passes what the
        device acked, so a queue rebuilt from it loses nothing (it may repeat what was acked
        since it was written)."""
        d = self.device
        return Record.new(d.user_id, d.client_id).positioned(self.position, self.subscription)

    async def record(self) -> None:
        """Write the device's record (records.py), as its owner: at connect when the device
        is new or its filters changed, on a subscription change, now and then while
        connected, and at close (the release). A failure is logged, not fatal: the queue
        holds the position; a refused write means another connection owns the device."""
        now = time.monotonic()
        self.recorded_floor, self.recorded_at = self.window.floor, now
        self.next_record = now + RECORD_SECONDS
        assert self.claim is not None
        records = self.gw.sessions.task("records")
        try:
            await self.gw.owners.save(self.claim, self.current_record())
        except Lost:
            self.close(Close.REPLACED, "another connection of this device took over")
        except Suspended:
            pass  # written when the device is reclaimed
        except Exception as exc:
            log.warning("could not write the record of %s: %s", self.consumer, exc)
            records.ran(exc)
        else:
            records.ran()

    @property
    def owning(self) -> bool:
        return self.claim is not None and self.claim.owning

    def _act(self) -> None:
        """Right before every request for the device's queue: only its owner may."""
        if self.claim is None:
            raise Lost(f"{self.consumer}: not claimed")
        self.claim.check()

    def needs_checkpoint(self) -> bool:
        return (
            self.mode is Mode.LIVE
            and checkpoint_due(self.window.floor, self.saved_floor)
            and self.owning
        )

    async def checkpoint(self) -> int:
        """Point the queue just past the acked floor (JetStream then knows the position, and
        reads resume there); return how many alerts it holds from there."""
        self._act()
        floor = self.window.floor
        reads = self.queue_reads
        pending = await self.gw.queues.reset(self.consumer, floor + 1)
        self.saved_floor = floor
        # In catchup a read follows; a read that overlapped the reset may have moved it.
        self.queue_at_floor = self.mode is Mode.LIVE and reads == self.queue_reads
        return pending

    def stats(self) -> ConnectionStats:
        return ConnectionStats(
            connection_id=self.id,
            connected_seconds=round(time.monotonic() - self.started, 3),
            alerts_sent=self.sent,
            alerts_redelivered=self.redelivered,
            acks_received=self.acks,
            inflight=len(self.window.items),
            mode=self.mode.value,
            acked_seq=self.window.floor,
            latency_ms=self.latency_ms,
        )

    def close(self, code: int, reason: str) -> None:
        """Ask the connection to end: the handler stops the session's tasks, saves its
        position, lets the device go, then closes the socket (:meth:`shut`)."""
        if self.closing is None:
            self.closing = (code, reason)
        self.stopped.set()

    async def shut(self) -> None:
        """Close the socket with the session's close code, bounded: a client that does not
        read cannot take the close frame, so after ``CLOSE_SECONDS`` (at most a heartbeat)
        the socket is aborted, and so is one whose unread frames would keep it open."""
        if self.corked:
            self.uncork()  # what was given to the socket goes before the close frame
        code, reason = self.closing or (Close.NORMAL, "")
        limit = min(CLOSE_SECONDS, self.gw.settings.heartbeat_seconds)
        if code in (Close.HEARTBEAT_TIMEOUT, Close.SLOW_CLIENT):
            # Silent or not reading: its answer to the close frame would not come either
            # (a dead link holds it a heartbeat longer). The frame goes out, then the abort.
            limit = min(limit, DEAD_CLOSE_SECONDS)
        if not self.ws.closed:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(limit):
                    await self.ws.close(code=code, message=reason.encode())
        # Not isinstance(asyncio.WriteTransport): uvloop's transports are not its subclasses.
        transport = cast("asyncio.Transport | None", self.transport)
        if transport is not None and (
            not transport.is_closing() or transport.get_write_buffer_size() > 0
        ):
            transport.abort()
