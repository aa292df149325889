"""The WAN emulator the wan notebook relies on: the relay delays and keeps every byte, the shaper paces, and
neither touches the host's own network. Only lower bounds are checked (nothing can be faster than the link it
emulates); how close to the set figures they come is measured in the notebook, not here."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest

from poc.workbook.emulation import wan


def echo_server() -> tuple[socket.socket, int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=conn: [c.sendall(d) for d in iter(lambda: c.recv(65536), b"")],
                             daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_the_relay_delays_each_direction_by_half_the_round_trip_and_keeps_every_byte():
    server, port = echo_server()
    proc, relay_port = wan.start_relay(port, rtt_ms=100)
    try:
        with socket.create_connection(("127.0.0.1", relay_port)) as sock:
            payload = bytes(range(256)) * 4096  # 1 MiB
            start = time.perf_counter()
            sock.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                received += sock.recv(1 << 20)
            elapsed = time.perf_counter() - start
        assert bytes(received) == payload
        assert elapsed >= 0.1  # there and back, 50 ms each way
    finally:
        proc.terminate()
        proc.wait()
        server.close()


SHAPED = """
import socket, threading, time
from poc.workbook.emulation import wan
wan.prepare_namespace()
server = socket.create_server(("127.0.0.1", 0)); port = server.getsockname()[1]
got = []
def sink():
    conn, _ = server.accept(); n = 0
    while data := conn.recv(1 << 20): n += len(data)
    got.append(n)
threading.Thread(target=sink).start()
hop = wan.WanHop(port, wan.LinkSpec(0, 50))
with socket.create_connection(("127.0.0.1", hop.port)) as sock:
    start = time.perf_counter(); sock.sendall(b"x" * 5_000_000); sock.shutdown(socket.SHUT_WR)
    while not got: time.sleep(0.01)
print(got[0], time.perf_counter() - start)
hop.close()
import subprocess
assert "class htb" not in subprocess.run(["tc", "class", "show", "dev", "lo"], capture_output=True, text=True).stdout
assert "flowid" not in subprocess.run(["tc", "filter", "show", "dev", "lo"], capture_output=True, text=True).stdout
"""


def test_a_shaped_hop_paces_its_bytes_inside_the_runs_own_namespace():
    """5 MB at 50 Mbit/s take at least 0.7 s (0.8 s, less the 256 KiB burst the shaper allows); a closed hop
    leaves no class or filter behind (a port used again must not inherit its rate); the host's loopback keeps
    its queueing discipline."""
    before = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    proc = wan.run_in_namespace([sys.executable, "-c", SHAPED], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    size, seconds = proc.stdout.split()
    assert int(size) == 5_000_000 and float(seconds) >= 0.7
    assert subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout == before


def test_shaping_is_refused_outside_a_namespace_of_the_runs_own(monkeypatch):
    monkeypatch.delenv(wan.PRIVATE_NS, raising=False)
    with pytest.raises(RuntimeError, match="outside a network namespace"):
        wan.shape_port(1234, 50)
    with pytest.raises(RuntimeError, match="outside a network namespace"):
        wan.prepare_namespace()


def test_link_specs_outside_the_emulated_range_are_refused():
    with pytest.raises(ValueError):
        wan.LinkSpec(rtt_ms=-1)
    with pytest.raises(ValueError):
        wan.LinkSpec(mbps=10**6)
