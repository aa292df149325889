"""Logging for every command: text for people, or one JSON object per line for log pipelines.

Log calls pass what they are about as `extra`: `tenant`, `session`, `request_id` (the Flight call's
`x-request-id`, followed from the client through the gateway into the connector), `stream_id`. The JSON
form carries them as fields; the text form appends them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

FIELDS = ("tenant", "session", "request_id", "stream_id")


def _context(record: logging.LogRecord) -> dict:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


class TextFormatter(logging.Formatter):
    """`time level logger: message [field=value ...]`; tracebacks in full, whatever sys.tracebacklimit says
    (the servers set it to 0 so that clients never see one: docs/security.md)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context(record)
        if context:
            head, sep, tail = line.partition("\n")
            line = head + " [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]" + sep + tail
        return line

    def formatException(self, ei) -> str:  # noqa: N802 (logging's naming)
        return "".join(traceback.format_exception(*ei, limit=64)).rstrip("\n")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the context fields that
    apply, and `exception` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage(), **_context(record)}
        if record.exc_info:
            doc["exception"] = "".join(traceback.format_exception(*record.exc_info, limit=64))
        return json.dumps(doc, default=str)


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr in `fmt` ("text" or "json") at `level`; quiet the WebSocket library's own chatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("websockets").setLevel(logging.WARNING)
