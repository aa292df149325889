"""The tunnel's integration tests run over both WebSocket implementations (gateway and connector alike)."""

from __future__ import annotations

import pytest

from poc import config

BOTH_IMPLEMENTATIONS = {"test_tunnel", "test_errors", "test_faults", "test_bad_input", "test_flow_control",
                        "test_protocol_doc", "test_security"}


def pytest_generate_tests(metafunc):
    if "ws_impl" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        impls = list(config.WS_IMPLS) if module in BOTH_IMPLEMENTATIONS else [config.WS_IMPL]
        metafunc.parametrize("ws_impl", impls, indirect=True)


@pytest.fixture(autouse=True)
def ws_impl(request, monkeypatch):
    """Every process a test starts uses this WebSocket implementation (POC_WS_IMPL)."""
    impl = getattr(request, "param", config.WS_IMPL)
    monkeypatch.setenv("POC_WS_IMPL", impl)
    return impl
