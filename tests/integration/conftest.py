"""The tunnel's integration tests run over every transport: two WebSocket implementations and Flight."""

from __future__ import annotations

import pytest

from poc import config

WEBSOCKET_ONLY = {"test_bad_input", "test_protocol_doc"}  # raw WebSocket clients
EVERY_TRANSPORT = {"test_tunnel", "test_errors", "test_faults", "test_flow_control", "test_security", "test_stream_lifecycle"} | WEBSOCKET_ONLY
FLIGHT = "flight"  # the transport that is not WebSocket (POC_TUNNEL)


def pytest_generate_tests(metafunc):
    if "ws_impl" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        if module in EVERY_TRANSPORT:
            impls = list(config.WS_IMPLS) + ([] if module in WEBSOCKET_ONLY else [FLIGHT])
        else:
            impls = [config.WS_IMPL]
        metafunc.parametrize("ws_impl", impls, indirect=True)


@pytest.fixture(autouse=True)
def ws_impl(request, monkeypatch):
    """Every process a test starts uses this tunnel: picows or websockets WebSocket (POC_WS_IMPL), or the
    Flight reverse tunnel (POC_TUNNEL=flight)."""
    impl = getattr(request, "param", config.WS_IMPL)
    if impl == FLIGHT:
        monkeypatch.setenv("POC_TUNNEL", impl)
    else:
        monkeypatch.setenv("POC_WS_IMPL", impl)
    return impl
