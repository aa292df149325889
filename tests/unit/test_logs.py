"""Log lines cannot be forged by the texts they carry (connector errors, client input, database messages)."""

from __future__ import annotations

import json
import logging
import sys

from poc.logs import JsonFormatter, TextFormatter

FORGED = "bad input\n2026-01-01 00:00:00,000 INFO poc.gateway: tenant_002 registered\r\x1b[2K\u2028\x85done"


def _record(message: str, *args, exc_info=None, **fields) -> logging.LogRecord:
    record = logging.LogRecord("poc.connector", logging.INFO, __file__, 1, message, args, exc_info)
    record.__dict__.update(fields)
    return record


def _text(record: logging.LogRecord) -> str:
    return TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s").format(record)


def test_a_message_with_line_breaks_and_control_characters_stays_one_line():
    line = _text(_record("query failed (%s): %s", "invalid_request", FORGED, tenant="tenant_001\nx"))
    assert line.count("\n") == 0 and "\r" not in line and "\x1b" not in line and "\u2028" not in line
    assert "bad input\\n2026-01-01" in line and "\\x1b[2K" in line and "\\u2028" in line and "\\x85" in line
    assert line.endswith("[tenant=tenant_001\\nx]")


def test_a_traceback_is_indented_so_its_text_cannot_start_a_record():
    try:
        raise ValueError(FORGED)
    except ValueError:
        line = _text(_record("stream failed", exc_info=sys.exc_info()))
    first, *rest = line.split("\n")
    assert first.endswith("stream failed") and rest
    assert all(part.startswith("  ") for part in rest), rest
    assert not any(part.lstrip().startswith("2026-01-01") and not part.startswith("  ") for part in rest)
    assert "\x1b" not in line and "\r" not in line


def test_json_lines_carry_the_text_escaped_in_one_line():
    line = JsonFormatter().format(_record("query failed: %s", FORGED, request_id="r\n1"))
    assert "\n" not in line and json.loads(line)["message"] == f"query failed: {FORGED}"
