"""Logging for operators: one line per event, text or JSON, tagged with the request id.

The request id lives in a context variable that the request-id middleware sets,
so every line written while serving a request carries it, whichever module logs.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import functools
import logging
import os
import sys
import time
from collections.abc import Mapping

import msgspec

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The caller's W3C trace id (from `traceparent`), when it sent a valid one.
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)
# The id of the key the request was made with, once it is known (never the secret).
key_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("key_id", default=None)

# uvicorn installs its own handlers on these; we route them through ours so the
# whole process speaks one format.
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        record.trace_id = trace_id.get()
        return True


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(context)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        # The trace id beside the request id, when the caller sent one.
        current, trace = getattr(record, "request_id", "-"), getattr(record, "trace_id", None)
        record.context = current if trace is None else f"{current} trace={trace}"
        return super().format(record)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _timestamp(record)


class JsonFormatter(logging.Formatter):
    _encoder = msgspec.json.Encoder()

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        trace = getattr(record, "trace_id", None)
        if trace is not None:
            entry["trace_id"] = trace
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encoder.encode(entry).decode()


def _timestamp(record: logging.LogRecord) -> str:
    # One line per request: the date part is formatted once per second, not per line.
    return f"{_utc_second(int(record.created))}.{int(record.msecs):03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return dt.datetime.fromtimestamp(second, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


def lenient_config(environ: Mapping[str, str]) -> tuple[str, str]:
    """LOG_LEVEL and LOG_FORMAT if usable, else the defaults: for the lines before settings are validated."""
    level = environ.get("LOG_LEVEL", "INFO").strip().upper()
    fmt = environ.get("LOG_FORMAT", "text").strip().lower()
    return (
        level if isinstance(logging.getLevelName(level), int) else "INFO",
        fmt if fmt in ("text", "json") else "text",
    )


def formatter_from_env() -> logging.Formatter:
    """For service/log_config.json, which uvicorn applies before it imports the app."""
    return JsonFormatter() if lenient_config(os.environ)[1] == "json" else TextFormatter()


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Send every logger (ours and uvicorn's) to stderr in one format."""
    # Neither format shows the thread, process or source line, and collecting them
    # costs ~3.5 µs of every line (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    # Replace our earlier handler (from log_config.json or a previous start-up), keep
    # anyone else's (pytest's capture, say).
    for old in list(root.handlers):
        if isinstance(old.formatter, (TextFormatter, JsonFormatter)):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our own access line replaces uvicorn's, which has no request id or duration.
    logging.getLogger("uvicorn.access").disabled = True


class Throttled:
    """Warnings of one kind at most once a second each, with how many there were since the last one.

    For what a hostile or broken client can make happen thousands of times a second (a cut
    connection, a malformed request): the first is logged at once, the rest are counted.
    """

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: object) -> None:
        now = time.monotonic()
        self._since[kind] = self._since.get(kind, 0) + 1
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            return
        count = self._since.pop(kind)
        if last is None or count == 1:
            self._logger.warning(message, *args)
        else:
            self._logger.warning(message + " (%d like it in the last %.0f s)", *args, count, now - last)
        self._last[kind] = now
