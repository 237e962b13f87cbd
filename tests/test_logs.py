"""Logs (tocsin.core.logs): the JSON and console formats, context fields, redaction; the
ingest service's idle pull loop logs no ERROR; a real ``tocsin ingest`` writes nothing
but JSON lines, no ERROR while idle, and never a token or the secret it handled."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from faststream.nats.subscriber.usecases.stream_pull_subscriber import PullStreamSubscriber
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from tocsin.core.logs import (
    ConsoleFormatter,
    ContextFilter,
    JsonFormatter,
    RedactFilter,
    Redactor,
    bind,
    context_fields,
    log_context,
    resolve_format,
    setup_logging,
    unbind,
)
from tocsin.core.naming import Names
from tocsin.core.settings import Settings
from tocsin.core.supervisor import settings_env, stop_process
from tocsin.ingest import app as ingest_app

from .conftest import SECRET
from .support import DEADLINE, alert, eventually, spawn_tocsin, token

ANSI = "\x1b["


# --- helpers -----------------------------------------------------------------------------
class Capture:
    """A handler as setup_logging builds it (context, redaction, a formatter) on a logger
    of its own, writing to a string."""

    def __init__(self, formatter: logging.Formatter, name: str, redactor: Redactor) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(formatter)
        self.handler.addFilter(ContextFilter())
        self.handler.addFilter(RedactFilter(redactor))
        self.logger = logging.getLogger(name)
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate = True

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]


@pytest.fixture
def json_log(request: pytest.FixtureRequest) -> Iterator[Capture]:
    capture = Capture(
        JsonFormatter(Redactor([SECRET]), service="test"),
        f"tocsin.test.{request.node.name}",
        Redactor([SECRET]),
    )
    yield capture
    capture.close()


@pytest.fixture
def console_log(request: pytest.FixtureRequest) -> Iterator[Capture]:
    capture = Capture(
        ConsoleFormatter(Redactor([SECRET])),
        f"tocsin.test.{request.node.name}",
        Redactor([SECRET]),
    )
    yield capture
    capture.close()


def raised(exc: BaseException) -> BaseException:
    """``exc`` with a traceback."""
    try:
        raise exc
    except BaseException as caught:
        return caught


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


# --- 1. formats --------------------------------------------------------------------------
def test_json_line_has_the_fields_an_operator_filters_on(json_log: Capture) -> None:
    before = datetime.now(UTC)
    with log_context(connection_id="c-1", device="phone 7"):
        json_log.logger.warning("closed %s after %d s", "socket", 3, extra={"code": 4503})
    (record,) = json_log.records()
    assert list(record)[:5] == ["ts", "level", "logger", "msg", "service"]
    assert record["level"] == "WARNING"
    assert record["logger"] == json_log.logger.name
    assert record["msg"] == "closed socket after 3 s"
    assert record["service"] == "test"
    assert record["connection_id"] == "c-1" and record["device"] == "phone 7"
    assert record["code"] == 4503
    assert "exc" not in record
    assert record["ts"].endswith("Z")
    moment = datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    offset = moment.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    assert abs((moment - before).total_seconds()) < 60  # UTC, not local time read as UTC


def test_json_exc_is_the_formatted_traceback_on_one_line(json_log: Capture) -> None:
    known: dict[str, int] = {}
    try:
        _ = known["missing"]
    except KeyError:
        json_log.logger.exception("lookup failed")
    lines = json_log.lines()
    assert len(lines) == 1
    (record,) = json_log.records()
    assert record["level"] == "ERROR" and record["msg"] == "lookup failed"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert "KeyError: 'missing'" in record["exc"] and "\n" in record["exc"]


def test_json_fields_do_not_overwrite_the_core_keys(json_log: Capture) -> None:
    with log_context(level="mine", msg="also mine"):
        json_log.logger.info("the message", extra={"ts": "x"})
    (record,) = json_log.records()
    assert record["level"] == "INFO" and record["msg"] == "the message"
    assert record["level_"] == "mine" and record["msg_"] == "also mine" and record["ts_"] == "x"


def test_json_values_that_are_not_json_are_written_as_text(json_log: Capture) -> None:
    with log_context(path=Path("/tmp/x"), seqs=(1, 2), tags={"t"}, nested={"a": Path("/y")}):
        json_log.logger.info("odd values")
    (record,) = json_log.records()
    assert record["path"] == "/tmp/x" and record["seqs"] == [1, 2] and record["tags"] == ["t"]
    assert record["nested"] == {"a": "/y"}


def test_json_is_ascii_and_one_line_whatever_the_message(json_log: Capture) -> None:
    json_log.logger.info("line one\nline two — “quoted” \x1b[31mred\x1b[0m")
    (line,) = json_log.lines()
    assert line.isascii()
    assert ANSI not in line  # escaped as \u001b: a terminal shows no colour from a JSON log
    assert json.loads(line)["msg"].startswith("line one\nline two")


def test_console_is_one_readable_line_with_key_value_context(console_log: Capture) -> None:
    with log_context(connection_id="c-1", device="phone 7", alert_id=None):
        console_log.logger.info("sent %d frames", 2, extra={"empty": ""})
    (line,) = console_log.lines()
    stamp, level, rest = line.split(" ", 2)
    assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).utcoffset() is not None
    assert level == "INFO"
    assert (
        rest.lstrip()
        == f'{console_log.logger.name}: sent 2 frames connection_id=c-1 device="phone 7"'
    )
    assert ANSI not in line


def test_console_leaves_the_access_logs_repeated_fields_to_json(
    console_log: Capture, json_log: Capture
) -> None:
    extra = {"first_request_line": "GET /readyz HTTP/1.1", "response_status": 200}
    with log_context(connection_id="c-1"):
        console_log.logger.info('127.0.0.1 "GET /readyz HTTP/1.1" 200', extra=extra)
    (line,) = console_log.lines()
    assert line.endswith('"GET /readyz HTTP/1.1" 200 connection_id=c-1')
    (record,) = json_log.records()  # the same logger: json keeps every field
    assert record["response_status"] == 200 and record["connection_id"] == "c-1"


def test_console_traceback_follows_the_line(console_log: Capture) -> None:
    console_log.logger.error("failed", exc_info=raised(ValueError("bad value")))
    first, *rest = console_log.lines()
    assert first.endswith(f"{console_log.logger.name}: failed")
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == "ValueError: bad value"


def test_console_colours_only_when_told() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
    assert ANSI not in ConsoleFormatter(colour=False).format(record)
    assert ANSI in ConsoleFormatter(colour=True).format(record)


def test_auto_is_console_on_a_terminal_else_json() -> None:
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("auto", Tty()) == "console"
    assert resolve_format("json", Tty()) == "json"
    assert resolve_format("console", io.StringIO()) == "console"


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging changes process-wide state: put it back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    faststream = logging.getLogger("faststream")
    fs_state = (list(faststream.handlers), faststream.propagate, faststream.level)
    hook = sys.excepthook
    yield
    sys.excepthook = hook
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    for handler in fs_state[0]:
        if handler not in faststream.handlers:
            faststream.addHandler(handler)
    faststream.propagate, faststream.level = fs_state[1], fs_state[2]
    logging.captureWarnings(False)


def test_setup_logging_one_root_handler_and_faststream_uncoloured(
    make_settings: Callable[..., Settings], root_logging: None
) -> None:
    import faststream  # noqa: F401  (its logger gets a coloured handler at import)

    assert logging.getLogger("faststream").handlers, "faststream no longer adds a handler?"
    stream = io.StringIO()
    setup_logging(make_settings(log_level="DEBUG"), service="ingest", stream=stream)
    handler = setup_logging(make_settings(log_level="INFO"), service="ingest", stream=stream)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_tocsin_handler", False)]
    assert ours == [handler]  # a second call replaces, never doubles
    assert logging.getLogger().level == logging.INFO
    assert isinstance(handler.formatter, JsonFormatter)  # auto, and not a terminal
    logging.getLogger("faststream").info("FastStream app starting...")
    logging.getLogger("tocsin.test").debug("below the level")
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["logger"] == "faststream" and record["service"] == "ingest"
    assert ANSI not in line


def test_setup_logging_an_uncaught_exception_is_one_record(
    make_settings: Callable[..., Settings], root_logging: None
) -> None:
    sys.excepthook = sys.__excepthook__  # pytest may have its own; a tocsin process has not
    stream = io.StringIO()
    setup_logging(make_settings(), stream=stream)
    error = raised(RuntimeError(f"crash with {JWT}"))
    sys.excepthook(type(error), error, error.__traceback__)
    (line,) = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "CRITICAL" and record["msg"] == "uncaught exception"
    assert record["exc"].endswith("RuntimeError: crash with [redacted-jwt]")


# --- 2. context --------------------------------------------------------------------------
def test_context_nests_unbinds_and_none_hides() -> None:
    assert dict(context_fields()) == {}
    with log_context(connection_id="c-1"):
        with log_context(device="d-1", connection_id="c-2"):
            assert dict(context_fields()) == {"connection_id": "c-2", "device": "d-1"}
            with log_context(device=None):
                assert dict(context_fields()) == {"connection_id": "c-2"}
        assert dict(context_fields()) == {"connection_id": "c-1"}
        token = bind(alert_id=7)
        assert dict(context_fields()) == {"connection_id": "c-1", "alert_id": 7}
        unbind(token)
        assert dict(context_fields()) == {"connection_id": "c-1"}
    assert dict(context_fields()) == {}


async def test_context_reaches_the_tasks_created_inside_and_never_leaks_out(
    json_log: Capture,
) -> None:
    started = asyncio.Event()
    proceed = asyncio.Event()

    async def child(name: str) -> None:
        with log_context(child=name):
            json_log.logger.info("from %s", name)
            started.set()
            await proceed.wait()
            json_log.logger.info("again from %s", name)

    async def connection() -> None:
        with log_context(connection_id="c-1"):
            task = asyncio.create_task(child("a"))
            await started.wait()
            bind(device="late")  # after the task was created: not in it
            json_log.logger.info("parent")
            proceed.set()
            await task

    async def sibling() -> None:
        await started.wait()
        json_log.logger.info("sibling")

    await asyncio.gather(connection(), sibling())
    json_log.logger.info("outside")
    by_msg = {r["msg"]: r for r in json_log.records()}
    assert by_msg["from a"]["connection_id"] == "c-1" and by_msg["from a"]["child"] == "a"
    assert "device" not in by_msg["again from a"]
    assert by_msg["parent"]["device"] == "late" and "child" not in by_msg["parent"]
    for msg in ("sibling", "outside"):
        assert not {"connection_id", "child", "device"} & set(by_msg[msg]), by_msg[msg]


# --- 3. redaction ------------------------------------------------------------------------
JWT = token(sub="alice", roles=("admin",))
SECRETS = (JWT, SECRET)


def secrets_in(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tokens_and_the_secret_never_reach_a_line(
    fmt: str, json_log: Capture, console_log: Capture
) -> None:
    capture = json_log if fmt == "json" else console_log
    lg = capture.logger
    lg.info(f"verify {JWT}")  # in the message
    lg.info("token %s refused", JWT)  # in the arguments
    lg.info('127.0.0.1 "GET /api/v1/alerts/ws?client_id=p&auth_token=%s HTTP/1.1" 101', "opaque")
    lg.info("env TOCSIN_JWT_SECRET=%s", "not-the-real-one-but-still-secret")
    lg.info("settings %s", {"jwt_secret": "another-secret-value"})
    lg.info("header Authorization: Bearer %s", "opaque-token-value")
    lg.info("the secret itself: %r", SECRET)
    with log_context(device=JWT, note=f"key={SECRET}"):
        lg.info("in the context")
    lg.info("in an extra", extra={"auth": JWT, "nested": {"k": [SECRET]}})
    lg.error("in a traceback", exc_info=raised(ValueError(f"bad token {JWT}")))
    lg.info("stack", stack_info=True)
    text = capture.text
    assert secrets_in(text) == []
    for leaked in ("opaque", "not-the-real-one", "another-secret-value", "opaque-token-value"):
        assert leaked not in text
    assert text.count("[redacted-jwt]") >= 5
    assert "auth_token=[redacted]" in text
    assert "TOCSIN_JWT_SECRET=[redacted]" in text
    assert "Bearer [redacted]" in text
    if fmt == "json":
        records = capture.records()  # still valid JSON after redaction
        assert records[-2]["exc"].endswith("ValueError: bad token [redacted-jwt]")
        assert records[-3]["nested"] == {"k": ["[redacted]"]}


def test_redactor_leaves_ordinary_text_alone() -> None:
    redact = Redactor([SECRET])
    for text in (
        "alert 42 -> ALERTS seq 7",
        "eyJ alone is not a token; neither is a.b.c",
        "client_id=phone ack_mode=client",
        "bearer of bad news: ",
    ):
        assert redact(text) == text


def test_redactor_forms_of_a_keyed_value() -> None:
    redact = Redactor()
    assert (
        redact(f"/ws?auth_token={JWT}&client_id=p") == "/ws?auth_token=[redacted-jwt]&client_id=p"
    )
    assert redact("jwt_secret='s3cr3t-value'") == "jwt_secret='[redacted]'"
    assert redact('{"auth_token": "opaque-1"}') == '{"auth_token": "[redacted]"}'
    assert redact('{"msg": "{\\"jwt_secret\\": \\"v\\"}"}') == (
        '{"msg": "{\\"jwt_secret\\": \\"[redacted]\\"}"}'
    )
    # prose that names the parameter keeps its words
    text = "missing_token: pass auth_token=... or Authorization: Bearer ..."
    assert redact(text) == "missing_token: pass auth_token=[redacted] or Authorization: Bearer ..."
    assert redact("no auth_token: send one") == "no auth_token: send one"


def test_redactor_takes_the_credentials_out_of_urls() -> None:
    redact = Redactor()
    assert redact("NATS nats://gateway:pa55-w0rd_x@127.0.0.1:4222,nats://tok3n@h:4223") == (
        "NATS nats://[redacted]@127.0.0.1:4222,nats://[redacted]@h:4223"
    )
    assert redact("see http://127.0.0.1:8080/readyz or mail a@b.org") == (
        "see http://127.0.0.1:8080/readyz or mail a@b.org"
    )


def test_redactor_ignores_a_short_secret() -> None:
    assert Redactor(["abc"])("abc abcdef") == "abc abcdef"
    assert Redactor([None, ""])("x") == "x"


def test_the_filter_redacts_the_record_for_every_handler() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "t=%s", (JWT,), None)
    record.__dict__["tocsin_fields"] = {"device": JWT}
    record.__dict__["extra_field"] = [SECRET]
    assert RedactFilter(Redactor([SECRET])).filter(record)
    assert record.getMessage() == "t=[redacted-jwt]"
    assert record.__dict__["tocsin_fields"] == {"device": "[redacted-jwt]"}
    assert record.__dict__["extra_field"] == ["[redacted]"]


# --- 4. the ingest's idle pull loop -------------------------------------------------------
def test_faststreams_task_done_line_is_dropped_and_nothing_else() -> None:
    logger = ingest_app._faststream_logger()
    chatter = logging.LogRecord(
        logger.name,
        logging.INFO,
        __file__,
        1,
        "callback for Task-9 is being executed...",
        None,
        None,
    )
    other = logging.LogRecord(
        logger.name,
        logging.ERROR,
        __file__,
        1,
        "Task-9 raised an exception, retrying...",
        None,
        None,
    )
    assert not logger.filter(chatter)
    assert logger.filter(other)
    assert len(logger.filters) == 1 and ingest_app._faststream_logger() is logger


async def test_a_pull_request_that_expires_empty_does_not_restart_the_consumer(
    settings: Settings,
    js: JetStreamContext,
    nc: NatsClient,
    names: Names,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """nats-py 2.16 ends an idle fetch with a bare asyncio.TimeoutError when the server's
    408 beats the client's timer (nats/js/client.py:1295); a race that a real server loses
    about once a minute here, so it is made to happen three times in a row. faststream's
    loop would die of it (an ERROR, a restart: a second task); the ingest's must not."""
    original = JetStreamContext.PullSubscription.fetch
    bare = 0

    async def fetch(
        self: JetStreamContext.PullSubscription,
        batch: int = 1,
        timeout: float | None = 5,
        heartbeat: float | None = None,
    ) -> list[Msg]:
        nonlocal bare
        if bare < 3:
            bare += 1
            raise asyncio.TimeoutError  # noqa: UP041  (what nats-py raises, as it spells it)
        return await original(self, batch, timeout, heartbeat)

    monkeypatch.setattr(JetStreamContext.PullSubscription, "fetch", fetch)
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(ContextFilter())  # as setup_logging's handler has it
    app = ingest_app.create_app(settings, list(settings.nats_url))
    await app.start()
    assert app.broker is not None
    (subscriber,) = app.broker.subscribers
    assert isinstance(subscriber, PullStreamSubscriber)
    try:
        await eventually(lambda: bare >= 3, DEADLINE, "three bare timeouts")
        body = alert("KE-30")
        await nc.publish(names.ingest_subject, orjson.dumps(body))

        async def stored() -> bool:
            return (await js.stream_info(names.alerts_stream)).state.messages == 1

        await eventually(stored, DEADLINE, "the event in ALERTS after the timeouts")
        tasks = list(subscriber.tasks)
        assert len(tasks) == 1 and not tasks[0].done(), "the consume loop was restarted"
        # faststream's done-callback of the task runs first; then this one
        after = asyncio.Event()
        tasks[0].add_done_callback(lambda _: after.set())
    finally:
        await app.stop()
    await asyncio.wait_for(after.wait(), DEADLINE)
    records = [r for r in caplog.records if r.name.startswith(("tocsin", "faststream"))]
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == []
    assert not [r for r in records if "is being executed" in r.getMessage()]
    stored_line = [r for r in records if r.getMessage().startswith(f"alert {body['alert_id']} ")]
    assert stored_line and stored_line[0].__dict__["tocsin_fields"]["alert_id"] == body["alert_id"]


# --- 5. a real `tocsin ingest`, idle, in JSON ---------------------------------------------
#: Idle pull requests the ingest process must go through: each one ends, after
#: ingest_app.PULL_TIMEOUT (1 s), in the timeout that used to be logged as an ERROR now and
#: then (measured: one expiry in 30 to 60 on loopback).
IDLE_PULLS = 12


@pytest.mark.slow
async def test_ingest_process_logs_json_no_error_when_idle_and_no_token(
    make_settings: Callable[..., Settings], names: Names, nc: NatsClient, tmp_path: Path
) -> None:
    settings = make_settings(log_format="json", log_level="DEBUG")
    env = settings_env(settings)
    assert env["TOCSIN_JWT_SECRET"] == SECRET and env["TOCSIN_LOG_FORMAT"] == "json"
    pulls: list[dict[str, Any]] = []

    async def on_pull(msg: Msg) -> None:
        pulls.append(json.loads(msg.data))

    # Every pull request of the ingest's durable, as the server receives it.
    watch = await nc.subscribe(
        f"$JS.API.CONSUMER.MSG.NEXT.{names.ingest_stream}.{names.ingest_consumer}", cb=on_pull
    )
    log = tmp_path / "ingest.log"
    proc = spawn_tocsin(["ingest"], env, log)
    try:
        # One fetch sends one no_wait request first; on an idle stream each fetch lasts
        # the pull timeout, so this is IDLE_PULLS expiries of it.
        def idle_fetches() -> int:
            assert proc.poll() is None, log.read_text()
            return sum(1 for p in pulls if p.get("no_wait"))

        await eventually(
            lambda: idle_fetches() > IDLE_PULLS,
            IDLE_PULLS * ingest_app.PULL_TIMEOUT * 4 + 30,
            f"{IDLE_PULLS} idle pull requests",
        )
        assert all(p["batch"] == ingest_app.PULL_BATCH for p in pulls)
        # An event that puts the token and the secret into the ingest's log lines: its
        # message_id header (faststream logs it as a field) and two unknown fields, named in
        # the rejection it logs.
        bad = alert("KE-30") | {JWT: 1, SECRET: 2}
        await nc.publish(names.ingest_subject, orjson.dumps(bad), headers={"message_id": JWT})
        await nc.flush()
        await eventually(
            lambda: "rejected event" in log.read_text(), DEADLINE, "the rejection logged"
        )
    finally:
        await watch.unsubscribe()
        code = stop_process(proc, 20, signal.SIGTERM)
    text = log.read_text()
    assert code == 0, text
    assert ANSI not in text
    assert secrets_in(text) == [], "a token or the secret reached the log"
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}")
    for record in records:
        assert {"ts", "level", "logger", "msg", "service"} <= set(record), record
        assert record["service"] == "ingest"
    errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert errors == [], errors
    assert not [r for r in records if "is being executed" in r["msg"]]
    (rejected,) = [r for r in records if r["msg"].startswith("rejected event")]
    assert rejected["level"] == "WARNING" and "ingest_seq" in rejected
    assert "[redacted-jwt]: Extra inputs are not permitted" in rejected["msg"]
    assert "[redacted]: Extra inputs are not permitted" in rejected["msg"]
    assert [r for r in records if r.get("message_id") == "[redacted-jwt]"]
    assert {"FastStream app starting...", "FastStream app shut down gracefully."} <= {
        r["msg"] for r in records
    }
