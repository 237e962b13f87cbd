"""Logs an operator can use: one format setting, context fields, never a token or secret.

Every tocsin process (``tocsin gateway``, ``tocsin ingest``, the ``tocsin run`` supervisor)
calls :func:`setup_logging` once, before it logs anything. It puts one handler on the
root logger, writing to stderr:

* ``TOCSIN_LOG_FORMAT=json``: one JSON object per line, always these keys first::

      {"ts": "2026-12-01T11:55:46.729Z", "level": "INFO", "logger": "tocsin.ingest.app",
       "msg": "alert 42 -> ALERTS seq 7", "service": "ingest", "alert_id": "42", ...}

  ``ts`` is ISO 8601 in UTC (milliseconds), ``level`` the level's name, ``logger`` the
  logger's name, ``msg`` the message with its arguments, ``service`` the process
  (``gateway``, ``ingest``, ``run``), then the context fields (below) and any ``extra=``
  fields of the call (faststream passes ``subject``, ``stream``, ``queue``,
  ``message_id``), and ``exc`` (the formatted traceback) / ``stack`` when there is one. A
  field whose name is one of these keys is written with a trailing ``_``. Lines are pure
  ASCII (``\\uXXXX`` escapes), so they stay valid JSON whatever the stream's encoding.
* ``TOCSIN_LOG_FORMAT=console``: one readable line per record, ``2026-12-01T11:55:46.729Z
  INFO    tocsin.ingest.app: message key=value ...`` (context fields, then ``extra=`` fields
  but those of aiohttp's access log, which repeat its line); a traceback follows on the
  next lines. The level is coloured only when stderr is a terminal (and ``NO_COLOR`` is
  unset): never an ANSI code in a file or a pipe.
* ``auto`` (the default): console when stderr is a terminal, else json.

faststream's own handlers (it installs coloured ones, the broker's on *stdout*) are not
used: the ingest service hands faststream a tocsin logger (``tocsin.ingest.faststream``),
and :func:`setup_logging` strips the handlers faststream put on its ``faststream`` logger so
anything logged there reaches the root handler too.

Context fields
--------------
Fields bound with :func:`log_context` (or :func:`bind`) are added to every record logged
in the same context: the current asyncio task, and every task created *after* they were
bound (``asyncio.create_task`` copies the context; ``asyncio.to_thread`` too, a bare
``loop.run_in_executor`` does not). They never leak into the task that created the
current one, nor into sibling tasks::

    from tocsin.core.logs import bind, log_context, unbind

    async def handle(ws, connection_id: str) -> None:
        with log_context(connection_id=connection_id):
            ...                                  # every log line: connection_id=...
            with log_context(device=device_id):  # nested: both fields
                ...
            with log_context(alert_id=alert.alert_id):
                log.info("sent")                 # connection_id=... alert_id=...

    token = bind(device=device_id)   # the same without a block ...
    try:
        ...
    finally:
        unbind(token)                # ... undone, in the same task

Any keyword works (``connection_id``, ``device``, ``alert_id`` are the gateway's); values
are written as they are when they are JSON numbers, booleans or strings, else as
``str(value)``. A value of ``None`` leaves the field out (and hides an outer one of the
same name). :func:`context_fields` returns what is bound now.

Redaction
---------
:class:`RedactFilter` (on the handler, so it sees records of every logger, tocsin's,
aiohttp's, faststream's, nats-py's) rewrites the message, the traceback, the stack, the
context fields and the ``extra=`` fields of each record, and the formatters run the same
rules over the finished line:

* anything shaped like a JWT (``eyJ`` + three base64url segments joined by dots) becomes
  ``[redacted-jwt]``;
* the value after ``auth_token=``, ``TOCSIN_JWT_SECRET=``, ``jwt_secret=`` (or the quoted
  ``"jwt_secret": "..."`` of JSON and reprs), and after ``Bearer`` (8 characters or more),
  becomes ``[redacted]``;
* the JWT secret itself (``TOCSIN_JWT_SECRET``, from the settings), wherever it appears,
  becomes ``[redacted]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Literal, TextIO

if TYPE_CHECKING:
    from .settings import Settings

__all__ = [
    "ConsoleFormatter",
    "ContextFilter",
    "JsonFormatter",
    "RedactFilter",
    "Redactor",
    "bind",
    "context_fields",
    "log_context",
    "resolve_format",
    "setup_logging",
    "unbind",
]

# ------------------------------------------------------------------- context fields
_EMPTY: Mapping[str, object] = MappingProxyType({})
_FIELDS: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "tocsin_log_fields", default=_EMPTY
)
Token = contextvars.Token[Mapping[str, object]]


def bind(**fields: object) -> Token:
    """Add ``fields`` to the records of this context (``None``: leave that one out);
    the token undoes it with :func:`unbind`."""
    merged = dict(_FIELDS.get())
    merged.update(fields)
    return _FIELDS.set(MappingProxyType({k: v for k, v in merged.items() if v is not None}))


def unbind(token: Token) -> None:
    """Undo the :func:`bind` that returned ``token`` (in the context that called it)."""
    _FIELDS.reset(token)


@contextlib.contextmanager
def log_context(**fields: object) -> Iterator[None]:
    """``fields`` on every record logged inside the block (and in tasks created there)."""
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def context_fields() -> Mapping[str, object]:
    """The fields bound in the current context."""
    return _FIELDS.get()


#: The record attribute where :class:`ContextFilter` puts the context fields.
FIELDS_ATTR = "tocsin_fields"


class ContextFilter(logging.Filter):
    """Copies the current context fields onto each record (as ``record.tocsin_fields``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, FIELDS_ATTR):
            setattr(record, FIELDS_ATTR, dict(_FIELDS.get()))
        return True


# ------------------------------------------------------------------- redaction
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# The key, then ``=`` and an optional quote (a query, an environment, a repr's keyword) or
# a quote, ``:`` and a quote (JSON, a dict's repr; \" inside a JSON string); the value.
_KEYED = re.compile(
    r"(?i)(\b(?:auth_token|(?:tocsin_)?jwt_secret)"
    r"(?:\s*=\s*(?:\\?[\"'])?|\\?[\"']\s*:\s*\\?[\"']))"
    r"([^\s\"'\\&,;)}\[\]]+)"
)
_BEARER = re.compile(r"(?i)(\bbearer\s+)([A-Za-z0-9._~+/=-]{8,})")
#: A URL's user information (nats://user:password@host, nats://token@host).
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^/@\s\"']+)@")
REDACTED = "[redacted]"
REDACTED_JWT = "[redacted-jwt]"
#: Shorter secrets are not looked for as they are (they would match ordinary words); the
#: settings ask 32 characters of TOCSIN_JWT_SECRET anyway.
MIN_SECRET_LENGTH = 8


class Redactor:
    """The redaction rules, with the literal secrets of this process."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                forms.add(secret)
                forms.add(json.dumps(secret)[1:-1])  # as it reads inside a JSON string
                forms.add(repr(secret)[1:-1])  # ... and inside a repr
        ordered = sorted(forms, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        text = _JWT.sub(REDACTED_JWT, text)
        text = _KEYED.sub(lambda m: m.group(1) + REDACTED, text)
        text = _USERINFO.sub(lambda m: m.group(1) + REDACTED + "@", text)
        return _BEARER.sub(lambda m: m.group(1) + REDACTED, text)

    def value(self, value: object) -> object:
        """A field's value with every string in it redacted (containers too)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self.value(v) for v in value]
        return value


_TRACEBACKS = logging.Formatter()


class RedactFilter(logging.Filter):
    """Redacts the message, traceback, stack, context and extra fields of each record."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format: the formatter reports it, with its own pass
            message = None
        if message is not None:
            record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(fields, dict):
            setattr(record, FIELDS_ATTR, {k: redact.value(v) for k, v in fields.items()})
        for key in _extra_keys(record):
            setattr(record, key, redact.value(getattr(record, key)))
        return True


# ------------------------------------------------------------------- formatters
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    FIELDS_ATTR,
}
#: The keys every JSON line starts with; fields of the same name get a trailing "_".
CORE_KEYS = ("ts", "level", "logger", "msg", "service", "exc", "stack")


def _extra_keys(record: logging.LogRecord) -> list[str]:
    return [k for k in vars(record) if k not in _RECORD_ATTRS and not k.startswith("_")]


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """Context fields, then ``extra=`` fields (an extra wins over a context field)."""
    out: dict[str, object] = {}
    bound = getattr(record, FIELDS_ATTR, None)
    if isinstance(bound, Mapping):
        out.update(bound)
    for key in _extra_keys(record):
        out[key] = getattr(record, key)
    return out


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _plain(value: object) -> object:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


class _Base(logging.Formatter):
    def __init__(self, redactor: Redactor | None = None, service: str | None = None) -> None:
        super().__init__()
        self.redactor = redactor or Redactor()
        self.service = service

    def _exc(self, record: logging.LogRecord) -> str | None:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return record.exc_text or None


class JsonFormatter(_Base):
    """One JSON object per line: ts, level, logger, msg, service, fields, exc, stack."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        for key, value in _fields(record).items():
            out[f"{key}_" if key in CORE_KEYS else key] = _plain(value)
        exc = self._exc(record)
        if exc:
            out["exc"] = exc
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return self.redactor(json.dumps(out, default=str))


_COLOURS = {
    logging.DEBUG: "\033[36m",
    logging.INFO: "\033[32m",
    logging.WARNING: "\033[33m",
    logging.ERROR: "\033[31m",
    logging.CRITICAL: "\033[91m",
}
#: The extra= field by which aiohttp's access log records are known (aiohttp web_log.py
#: passes every part of the line it formatted again, as fields: JSON keeps them).
_ACCESS_LINE = "first_request_line"
_SAFE_VALUE = re.compile(r"^[^\s\"'=\\]+$")


def _console_value(value: object) -> str:
    text = str(value)
    return text if _SAFE_VALUE.match(text) else json.dumps(text)


class ConsoleFormatter(_Base):
    """``ts LEVEL logger: msg key=value ...``; colours only when told to (a terminal)."""

    def __init__(
        self, redactor: Redactor | None = None, service: str | None = None, colour: bool = False
    ) -> None:
        super().__init__(redactor, service)
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname:<7}"
        if self.colour and record.levelno in _COLOURS:
            level = f"{_COLOURS[record.levelno]}{level}\033[0m"
        message = record.getMessage()
        line = f"{_timestamp(record)} {level} {record.name}: {message}"
        fields = _fields(record)
        if _ACCESS_LINE in fields:  # aiohttp's access log: its extras repeat the line
            bound = getattr(record, FIELDS_ATTR, None)
            fields = dict(bound) if isinstance(bound, Mapping) else {}
        pairs = [
            f"{key}={_console_value(value)}"
            for key, value in fields.items()
            if value is not None and value != ""
        ]
        if pairs:
            line += " " + " ".join(pairs)
        exc = self._exc(record)
        if exc:
            line += "\n" + exc
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return self.redactor(line)


# ------------------------------------------------------------------- setup
def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


def resolve_format(setting: str, stream: TextIO) -> Literal["json", "console"]:
    """``auto`` -> console on a terminal, else json; ``json`` and ``console`` as they are."""
    if setting == "json":
        return "json"
    if setting == "console":
        return "console"
    return "console" if _isatty(stream) else "json"


def _colour(stream: TextIO) -> bool:
    return _isatty(stream) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


#: Library loggers that come with handlers of their own (faststream's are coloured): those
#: are removed and the records go to the root handler like everyone else's.
LIBRARY_LOGGERS = ("faststream", "faststream.access", "faststream.access.nats")
_OURS = "_tocsin_handler"


def setup_logging(
    settings: Settings, *, service: str | None = None, stream: TextIO | None = None
) -> logging.Handler:
    """The process's logging, from ``TOCSIN_LOG_FORMAT`` and ``TOCSIN_LOG_LEVEL``: one
    handler on the root logger (replacing the one an earlier call installed), writing to
    ``stream`` (stderr); Python warnings and an uncaught exception are logged too.
    Returns the handler."""
    stream = sys.stderr if stream is None else stream
    redactor = Redactor([settings.jwt_secret, os.environ.get("TOCSIN_JWT_SECRET")])
    formatter: logging.Formatter
    if resolve_format(settings.log_format, stream) == "json":
        formatter = JsonFormatter(redactor, service)
    else:
        formatter = ConsoleFormatter(redactor, service, colour=_colour(stream))
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter(redactor))
    setattr(handler, _OURS, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in LIBRARY_LOGGERS:
        if name in logging.root.manager.loggerDict:  # only those already configured
            lib = logging.getLogger(name)
            for own in list(lib.handlers):
                lib.removeHandler(own)
            lib.propagate = True
            lib.setLevel(logging.NOTSET)  # TOCSIN_LOG_LEVEL decides
    logging.captureWarnings(True)
    if sys.excepthook is sys.__excepthook__:  # a crash's traceback: one record too
        sys.excepthook = _log_uncaught
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("tocsin").critical("uncaught exception", exc_info=(kind, exc, tb))
