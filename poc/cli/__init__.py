"""`python -m poc <command>`: the product's commands — gateway, connector, direct — each in a module of its own here,
and the commands other installed parts add through the `poc.commands` entry-point group (the workbook's
measurements: pyproject.toml). A part whose dependencies are missing is left out of the list; naming one of
its commands says what to install."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

from .. import logs
from ..config import ConfigError
from . import connector, direct, gateway

COMMANDS_GROUP = "poc.commands"  # entry points: a function that adds one command's parser to the subparsers


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command there is; `unavailable` names the commands whose part cannot load, and why."""
    parser = argparse.ArgumentParser(
        prog="python -m poc",
        description="Arrow Flight through a reverse WebSocket tunnel: run the gateway, a connector or the direct "
                    "baseline (and, with the workbook installed, make datasets, load, benchmark and report). Each "
                    "server prints one JSON line {\"ready\": true, ...ports} on stdout once it serves; logs go to "
                    "stderr.")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="text for people, or one JSON object per line with tenant, session, request_id and "
                             "stream_id fields where they apply (default %(default)s); before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (gateway, connector, direct):
        command.add(sub)
    parser.unavailable = _added_commands(sub)
    return parser


def _added_commands(sub) -> dict[str, str]:
    """Add the commands of the `poc.commands` entry points; return those that could not load, with the module
    that is missing."""
    missing = {}
    for entry in sorted(importlib.metadata.entry_points(group=COMMANDS_GROUP), key=lambda e: e.name):
        try:
            add = entry.load()
        except ImportError as exc:
            missing[entry.name] = exc.name or str(exc)
            continue
        add(sub)
    return missing


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    named = next((token for token in argv if token in parser.unavailable), None)
    if named is not None:
        print(f"error: `{named}` is part of the workbook, which needs {parser.unavailable[named]}: pip install "
              "'poc[workbook]'", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except ConfigError as exc:
        logs.flush()  # the error is the last line, whatever the log's thread had still to write
        print(f"error: {exc}", file=sys.stderr)
        return 2
