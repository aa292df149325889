"""Logging for every command: text for people, or one JSON object per line for log pipelines.

Log calls pass what they are about as `extra`: `tenant`, `session`, `request_id` (the Flight call's
`x-request-id`, followed from the client through the gateway into the connector), `stream_id`. The JSON
form carries them as fields; the text form appends them.

Texts in log lines come from connectors, clients and databases too, so the text form cannot be forged: every
record is one line, with CR, LF and other control characters in its message and fields escaped (`\\n`,
`\\x1b`); a traceback follows on lines of its own, each indented, so no text can start a line that looks like
a record of its own. JSON escapes them by itself.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import re
import sys
import time
import traceback

FIELDS = ("tenant", "session", "request_id", "stream_id")


def _context(record: logging.LogRecord) -> dict:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str) -> str:
    """`text` on one line: CR, LF, tabs and every other control character (C0, C1, Unicode line separators)
    written as escapes."""
    return _CONTROL.sub(lambda m: _NAMED_ESCAPES.get(m.group(), f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                                     else f"\\u{ord(m.group()):04x}"), text)


class TextFormatter(logging.Formatter):
    """`time level logger: message [field=value ...]` on one line, whatever the texts in it hold; a traceback
    in full below it, every line indented (whatever sys.tracebacklimit says: the servers set it to 0 so that
    clients never see one, docs/security.md)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        context = _context(record)
        if context:
            line += " [" + " ".join(f"{k}={escape_controls(str(v))}" for k, v in context.items()) + "]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line

    def formatException(self, ei) -> str:  # noqa: N802 (logging's naming)
        return _indented("".join(traceback.format_exception(*ei, limit=64)).rstrip("\n"))


def _indented(text: str) -> str:
    """Every line of a traceback behind two spaces, its control characters other than the line ends escaped."""
    return "\n".join("  " + escape_controls(line) for line in text.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the context fields that
    apply, and `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(), **_context(record)}
        if record.exc_info:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info, limit=64))
        return json.dumps(doc, default=str)


_listener: logging.handlers.QueueListener | None = None


@atexit.register
def _stop_listener() -> None:
    """Write what is still queued and stop the writing thread (at exit, and before a new setup)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


def flush() -> None:
    """Write every line logged so far, then go on: before anything printed to stderr directly, so that an error
    ending a command comes after the lines that led to it (one writing thread writes the log, on its own time)."""
    if _listener is not None:
        _listener.stop()
        _listener.start()


class _FormattingQueueHandler(logging.handlers.QueueHandler):
    """Formats with the writing handler's formatter in the logging thread (context fields, exceptions),
    then hands the finished line over."""

    def __init__(self, records: queue.SimpleQueue, formatter: logging.Formatter) -> None:
        super().__init__(records)
        self.setFormatter(formatter)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        line = self.format(record)
        prepared = logging.makeLogRecord({"msg": line, "levelno": record.levelno, "levelname": record.levelname,
                                          "name": record.name})
        return prepared


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr in `fmt` ("text" or "json") at `level`; quiet the WebSocket library's own chatter."""
    formatter = (JsonFormatter() if fmt == "json" else
                 TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # lines arrive formatted
    global _listener
    _stop_listener()
    # Threads that log only format and enqueue; one thread writes. A Flight call's thread that blocks on the
    # handler's lock or its write gives up the GIL, and under load winning it back costs that call most of
    # its time (docs/results.md).
    records: queue.SimpleQueue = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, handler)
    _listener.start()
    logging.basicConfig(level=level, handlers=[_FormattingQueueHandler(records, formatter)], force=True)
    logging.getLogger("websockets").setLevel(logging.WARNING)
