"""What the product's commands share: the ready line, signals, the event loop, and the options several take."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import threading

from .. import config
from ..config import ConfigError
from ..tunnel import Limits


def emit_ready(**fields) -> None:
    """One JSON line on stdout once a component serves: how the runner and tests learn its ports."""
    print(json.dumps({"ready": True, **fields}), flush=True)


def serve_flight(server, component: str, **ports) -> None:
    """Announce a Flight server (its ready line with `ports`) and serve it until SIGTERM or SIGINT, which shut
    it down: shutdown() waits for calls in flight, so it runs on a thread of its own, not the signal's stack."""
    def shutdown(*_) -> None:
        threading.Thread(target=server.shutdown, name="shutdown").start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shutdown)
    emit_ready(component=component, pid=os.getpid(), **ports)
    server.serve()


def stop_event_for_signals(loop: asyncio.AbstractEventLoop) -> asyncio.Event:
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def add_tunnel_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-frame-bytes", type=int, default=config.MAX_FRAME_BYTES,
                   help="largest binary frame payload a connector may send (default %(default)s)")
    p.add_argument("--window-bytes", type=int, default=config.MAX_WINDOW_BYTES,
                   help="the largest credit window of a stream: the most bytes buffered per stream "
                        "(default %(default)s)")
    p.add_argument("--initial-window-bytes", type=int, default=None,
                   help=f"a stream's window when it opens (default {config.INITIAL_WINDOW_BYTES}, kept between "
                        "--max-frame-bytes and --window-bytes); with --window-policy adaptive it grows towards twice the link's measured "
                        "bandwidth-delay product, up to --window-bytes, while --max-buffered-bytes has room")
    p.add_argument("--window-policy", choices=("adaptive", "fixed"), default="adaptive",
                   help="adaptive: windows grow with the link's bandwidth-delay product, measured with pings "
                        "(protocol 1.4 connectors); fixed: they keep their initial size (default %(default)s)")
    p.add_argument("--codecs", default="zstd,lz4",
                   help="IPC body codecs accepted from connectors that offer them, best first, comma-separated; "
                        "'' or none accepts none (default %(default)s; docs/protocol.md §4b)")
    p.add_argument("--max-streams", type=int, default=config.MAX_STREAMS,
                   help="streams in flight per connector link (default %(default)s)")
    p.add_argument("--max-message-bytes", type=int, default=config.MAX_MESSAGE_BYTES,
                   help="largest control message from a connector (default %(default)s)")
    p.add_argument("--max-unsolicited-per-s", type=float, default=config.UNSOLICITED_PER_S,
                   help="heartbeats and messages for closed streams a connector may send per second; "
                        "a flood closes its link with 4005 (default %(default)s)")
    p.add_argument("--max-requests-per-s", type=float, default=0.0,
                   help="Flight calls forwarded into one tenant's tunnel per second; over it a call fails at "
                        "once with FlightUnavailableError; 0 = unlimited (default %(default)s)")


def add_event_loop(p: argparse.ArgumentParser) -> None:
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"),
                   default=os.environ.get("POC_EVENT_LOOP", "asyncio"),
                   help="asyncio's own event loop, or uvloop's (libuv; pip install 'poc[uvloop]'). Measured, "
                        "uvloop did not pay here (docs/results.md): picows already does the socket work in "
                        "Cython (default %(default)s; POC_EVENT_LOOP sets the default)")


def run_on_event_loop(main, args: argparse.Namespace) -> None:
    """asyncio.run(main()) on the event loop --event-loop names."""
    if getattr(args, "event_loop", "asyncio") == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ConfigError("--event-loop uvloop needs uvloop: pip install 'poc[uvloop]'") from None
        logging.getLogger("poc").info("event loop: uvloop %s", uvloop.__version__)
        uvloop.run(main())
        return
    asyncio.run(main())


def add_ws_impl(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ws-impl", choices=config.WS_IMPLS, default=os.environ.get("POC_WS_IMPL", config.WS_IMPL),
                   help="WebSocket implementation; both speak the same wire protocol "
                        "(default %(default)s; POC_WS_IMPL sets the default)")


def add_tls(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="PEM certificate chain: serve wss:// and grpc+tls:// (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")


def check_tls(args: argparse.Namespace) -> None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")


def tunnel_limits(args: argparse.Namespace):
    codecs = tuple(c.strip() for c in args.codecs.split(",") if c.strip() and c.strip() != "none")
    if args.window_bytes < args.max_frame_bytes:
        raise ConfigError("--window-bytes must be at least --max-frame-bytes")
    initial = args.initial_window_bytes
    if initial is not None and not args.max_frame_bytes <= initial <= args.window_bytes:
        raise ConfigError("--initial-window-bytes must lie between --max-frame-bytes and --window-bytes")
    try:
        return Limits(args.max_frame_bytes, args.window_bytes, args.max_streams,
                      max_message_bytes=args.max_message_bytes, unsolicited_per_s=args.max_unsolicited_per_s,
                      initial_window_bytes=args.initial_window_bytes, adaptive_window=args.window_policy == "adaptive",
                      codecs=codecs)
    except ValueError as exc:
        raise ConfigError(f"gateway limits: {exc}") from None


def add_cors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cors-origin", action="append",
                   help="an origin (scheme://host:port) whose pages may call the HTTP Arrow endpoints from a "
                        "browser (repeatable; none by default: only pages served by this port)")


def hide_tracebacks_from_clients() -> None:
    """pyarrow's Flight server appends a Python error's formatted traceback (file paths, code) to the message
    a client receives; with no frames to format, the client sees the message only (docs/security.md)."""
    sys.tracebacklimit = 0


