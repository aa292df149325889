"""WAN emulation on loopback: a delaying relay in user space, bandwidth from `tc` in a private namespace.

This kernel has no `netem`, so latency comes from a relay process that holds every chunk it reads for half
the round trip before passing it on (each direction), and bandwidth from an `htb` class on the loopback
device of a network namespace the run creates itself (`unshare --net`), matched by the relay's port: the
sender's bytes are paced by the kernel into the relay, which delays them, like a bottleneck link followed
by its propagation delay. Nothing here touches the host's own network: shaping refuses to run outside a
namespace this module made (`in_private_namespace`).

    python -m poc.workbook.emulation.wan --target 127.0.0.1:8443 --rtt-ms 100     # prints the port it listens on

The WAN experiment that uses it is poc.workbook.experiments.wan.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PRIVATE_NS = "POC_WAN_NAMESPACE"  # set in the environment of a run inside its own network namespace
BUFFER_BYTES = 64 * 1024 * 1024  # per direction: what the relay holds before it stops reading


@dataclass(frozen=True)
class LinkSpec:
    """One emulated hop: round-trip time added (ms) and bandwidth each way (Mbit/s, 0 = not shaped)."""

    rtt_ms: float = 0.0
    mbps: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.rtt_ms <= 2000 or not 0 <= self.mbps <= 100_000:
            raise ValueError(f"a link needs 0 <= rtt_ms <= 2000 and 0 <= mbps <= 100000, got {self}")

    @classmethod
    def of(cls, value: "LinkSpec | dict | None") -> "LinkSpec":
        if isinstance(value, LinkSpec):
            return value
        return cls(**(value or {}))

    @property
    def plain(self) -> bool:
        return self.rtt_ms == 0 and self.mbps == 0

    def label(self) -> str:
        bandwidth = f"{self.mbps:g} Mbps" if self.mbps else "unshaped"
        return f"{self.rtt_ms:g} ms, {bandwidth}"


# ----------------------------------------------------------------------------- the relay

class _Side(asyncio.Protocol):
    """One socket of a relayed connection; what it reads leaves from its twin after `delay_s`."""

    def __init__(self, delay_s: float, limit: int, inbound: bool = False) -> None:
        self.inbound = inbound  # accepted: reads nothing until its twin is connected
        self.delay_s = delay_s
        self.limit = limit
        self.twin: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.line: collections.deque[tuple[float, bytes]] = collections.deque()  # (due, chunk), oldest first
        self.held = 0
        self.reading_paused = False
        self.twin_paused = False  # the twin's socket buffer is full
        self.timer: asyncio.TimerHandle | None = None
        self.eof = False
        self.early: list[bytes] = []  # read before the twin connected
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.inbound:
            transport.pause_reading()
        self.ready.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.twin is None or self.twin.transport is None:  # before its twin connected (uvloop reads early)
            self.early.append(data)
            return
        if self.delay_s <= 0 and not self.line:
            self.twin.transport.write(data)
        else:
            self.line.append((asyncio.get_running_loop().time() + self.delay_s, data))
            self.held += len(data)
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_at(self.line[0][0], self._release)
        self._throttle()

    def _release(self) -> None:
        self.timer = None
        now = asyncio.get_running_loop().time()
        while self.line and self.line[0][0] <= now and not self.twin_paused:
            _, chunk = self.line.popleft()
            self.held -= len(chunk)
            self.twin.transport.write(chunk)
        if self.line and not self.twin_paused:
            self.timer = asyncio.get_running_loop().call_at(self.line[0][0], self._release)
        elif not self.line and self.eof:
            self.twin.end()
        self._throttle()

    def end(self) -> None:
        """Pass an end of stream on: half-close this side's socket (or close it if it cannot)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.write_eof() if transport.can_write_eof() else transport.close()
        except OSError:
            transport.close()

    def _throttle(self) -> None:
        full = self.held > self.limit or self.twin_paused
        if full and not self.reading_paused:
            self.transport.pause_reading()
            self.reading_paused = True
        elif not full and self.reading_paused:
            self.transport.resume_reading()
            self.reading_paused = False

    # the twin's writing side tells this side when to stop and start passing chunks on
    def pause_writing(self) -> None:
        self.twin.twin_paused = True
        self.twin._throttle()

    def resume_writing(self) -> None:
        self.twin.twin_paused = False
        if self.twin.line and self.twin.timer is None:
            self.twin._release()
        self.twin._throttle()

    def eof_received(self) -> bool:
        self.eof = True
        if self.twin is None or self.twin.transport is None:
            return True
        if not self.line:
            self.twin.end()
        return True

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.twin is not None and self.twin.transport is not None and not self.twin.transport.is_closing():
            self.twin.transport.close()


async def serve_relay(target: tuple[str, int], rtt_ms: float, host: str = "127.0.0.1", port: int = 0,
                      buffer_bytes: int = BUFFER_BYTES) -> asyncio.AbstractServer:
    """Accept on (host, port); each connection is relayed to `target`, each direction `rtt_ms / 2` late."""
    loop = asyncio.get_running_loop()
    one_way = rtt_ms / 2000

    async def join(inbound: _Side) -> None:
        await inbound.ready
        try:
            _, outbound = await loop.create_connection(lambda: _Side(one_way, buffer_bytes), *target)
        except OSError:
            inbound.transport.abort()
            return
        inbound.twin, outbound.twin = outbound, inbound
        early, inbound.early = inbound.early, []
        for chunk in early:
            inbound.data_received(chunk)
        if inbound.eof:
            inbound.eof_received()
        inbound.transport.resume_reading()

    def accept() -> _Side:
        side = _Side(one_way, buffer_bytes, inbound=True)
        task = loop.create_task(join(side))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return side

    tasks: set[asyncio.Task] = set()

    return await loop.create_server(accept, host, port)


def start_relay(target_port: int, rtt_ms: float, target_host: str = "127.0.0.1") -> tuple[subprocess.Popen, int]:
    """A relay process in front of `target_port`; returns it and the port it listens on."""
    proc = subprocess.Popen([sys.executable, "-m", "poc.workbook.emulation.wan", "--target",
                             f"{target_host}:{target_port}", "--rtt-ms", str(rtt_ms)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the relay did not start (it printed {line!r})")
    return proc, int(line)


# ----------------------------------------------------------------------------- bandwidth (tc)

def in_private_namespace() -> bool:
    return os.environ.get(PRIVATE_NS) == "1"


def prepare_namespace() -> None:
    """Inside a namespace of our own: loopback up, an htb root whose unclassified traffic is not shaped."""
    if not in_private_namespace():
        raise RuntimeError("refusing to shape the loopback device outside a network namespace this run made")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["tc", "qdisc", "replace", "dev", "lo", "root", "handle", "1:", "htb"], check=True)


_classes = iter(range(10, 10_000))


def shape_port(port: int, mbps: float) -> list[int]:
    """Pace traffic to and from `port` on loopback at `mbps` each way (one htb class per direction, its
    filter at a priority of its own); returns the class numbers, for `unshape`."""
    if not in_private_namespace():
        raise RuntimeError("refusing to shape the loopback device outside a network namespace this run made")
    rate = f"{mbps:g}mbit"
    burst = str(max(256 * 1024, int(mbps * 1e6 / 8 / 250)))  # a few ms of the rate, at least a 64 KiB GSO packet
    numbers = []
    for match in ("dport", "sport"):
        number = next(_classes)
        numbers.append(number)
        subprocess.run(["tc", "class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{number}", "htb", "rate",
                        rate, "ceil", rate, "burst", burst, "cburst", burst, "quantum", "60000"], check=True)
        subprocess.run(["tc", "filter", "add", "dev", "lo", "protocol", "ip", "parent", "1:", "prio", str(number),
                        "u32", "match", "ip", match, str(port), "0xffff", "flowid", f"1:{number}"], check=True)
    return numbers


def unshape(numbers: list[int]) -> None:
    """Remove what `shape_port` added: a port number used again later must not inherit an old rate."""
    for number in numbers:
        subprocess.run(["tc", "filter", "del", "dev", "lo", "parent", "1:", "prio", str(number)], check=False,
                       capture_output=True)
        subprocess.run(["tc", "class", "del", "dev", "lo", "classid", f"1:{number}"], check=False,
                       capture_output=True)


class WanHop:
    """One emulated hop in front of a server port: a relay when the hop has latency (or bandwidth, which is
    shaped at the relay's port), nothing at all when it is plain. `port` is where clients connect."""

    def __init__(self, target_port: int, spec: LinkSpec) -> None:
        self.spec = spec
        self.proc: subprocess.Popen | None = None
        self.classes: list[int] = []
        self.port = target_port
        if spec.plain:
            return
        self.proc, self.port = start_relay(target_port, spec.rtt_ms)
        self.classes = shape_port(self.port, spec.mbps) if spec.mbps else []

    def close(self) -> None:
        unshape(self.classes)
        self.classes = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "WanHop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_in_namespace(argv: list[str], progress=None, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a command in a new network namespace (as root, or as an unprivileged user mapped to root in a new
    user namespace where the kernel allows it), with loopback shaping allowed inside. With `capture`, its
    output lines go to `progress` as they come and are returned in `stdout`."""
    env = {**os.environ, PRIVATE_NS: "1", **kwargs.pop("env", {})}
    prefix = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    if not capture:
        return subprocess.run(prefix + ["--"] + argv, env=env, **kwargs)
    kwargs.pop("check", None)
    lines = []
    with subprocess.Popen(prefix + ["--"] + argv, env=env, **kwargs) as proc:
        try:
            for line in proc.stdout:
                lines.append(line)
                if progress is not None:
                    progress(line.rstrip())
        finally:
            if proc.poll() is None:  # stopped early (an interrupt): stop the run and what it started
                proc.terminate()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), None)


def run_experiment_in_namespace(module: str, params, name: str, progress=print) -> dict:
    """An experiment whose every cell runs in a network namespace of its own: its parameters to
    OUT/params.json, `python -m MODULE run` in a new namespace (progress lines passed on as they come; see
    `experiment_main`), and the figures it wrote to OUT/NAME.json read back."""
    out = params.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(dataclasses.asdict(params), indent=1))
    proc = run_in_namespace([sys.executable, "-m", module, "run", "--params", str(out / "params.json"),
                             "--out", str(out / f"{name}.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, check=False, capture=True, progress=progress)
    if proc.returncode != 0:
        raise RuntimeError(f"the {name} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return json.loads((out / f"{name}.json").read_text())


def experiment_main(argv: list[str] | None, module: str, doc: str, params_type, run_cells) -> None:
    """The command line `run_experiment_in_namespace` starts inside the namespace: `run --params P --out F`
    runs `run_cells(params_type(**P))` and writes its figures to F."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="every cell, inside a network namespace made for it")
    run.add_argument("--params", required=True, help=f"JSON file of {params_type.__name__}")
    run.add_argument("--out", required=True, help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    params = params_type(**json.loads(Path(args.params).read_text()))
    figures = run_cells(params, log=lambda line: print(line, flush=True))
    Path(args.out).write_text(json.dumps(figures, indent=1))


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m poc.workbook.emulation.wan",
                                     description="relay 127.0.0.1:PORT to a target, each direction half the RTT late")
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add (default 0)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one, printed)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")

    async def relay() -> None:
        server = await serve_relay((host or "127.0.0.1", int(port)), args.rtt_ms, port=args.port)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(relay())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
