"""The tunnel's integration tests run over every transport: two WebSocket implementations, gRPC and Flight."""

from __future__ import annotations

import pytest

from poc import config

WEBSOCKET_ONLY = {"test_bad_input", "test_protocol_doc"}  # raw WebSocket clients
EVERY_TRANSPORT = {"test_tunnel", "test_errors", "test_faults", "test_flow_control", "test_security", "test_stream_lifecycle",
                   "test_grpc_bad_input"} | WEBSOCKET_ONLY
GRPC = "grpc"
FLIGHT = "flight"
TUNNELS = (GRPC, FLIGHT)  # the transports that are not WebSocket (POC_TUNNEL)


def pytest_generate_tests(metafunc):
    if "ws_impl" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        if module == "test_grpc_bad_input":
            impls = [GRPC]
        elif module in EVERY_TRANSPORT:
            impls = list(config.WS_IMPLS) + ([] if module in WEBSOCKET_ONLY else list(TUNNELS))
        else:
            impls = [config.WS_IMPL]
        metafunc.parametrize("ws_impl", impls, indirect=True)


@pytest.fixture(autouse=True)
def ws_impl(request, monkeypatch):
    """Every process a test starts uses this tunnel: picows or websockets WebSocket (POC_WS_IMPL), or the
    gRPC or Flight reverse tunnel (POC_TUNNEL=grpc, POC_TUNNEL=flight)."""
    impl = getattr(request, "param", config.WS_IMPL)
    if impl in TUNNELS:
        monkeypatch.setenv("POC_TUNNEL", impl)
    else:
        monkeypatch.setenv("POC_WS_IMPL", impl)
    return impl
