"""Which proxy a gateway URL goes through (poc.connector.proxy): --proxy, or the usual variables, decided once."""

from __future__ import annotations

import pytest

from poc.config import ConfigError
from poc.connector.proxy import for_gateway, from_option


@pytest.fixture
def no_proxy_variables(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                 "ALL_PROXY", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_option_takes_a_user_and_the_password_only_from_the_environment():
    proxy = from_option("http://corp%5Cjo@proxy.corp:3128", {"POC_PROXY_PASSWORD": "s3cr:et@"})
    assert proxy.url == "http://corp%5Cjo:s3cr%3Aet%40@proxy.corp:3128"
    assert proxy.shown == "http://corp%5Cjo@proxy.corp:3128" and "s3cr" not in repr(proxy)
    assert from_option("proxy.corp:3128", {}).url == "http://proxy.corp:3128"
    with pytest.raises(ConfigError, match="must not carry a password.*POC_PROXY_PASSWORD") as refused:
        from_option("http://jo:hunter2@proxy.corp:3128", {})
    assert "hunter2" not in str(refused.value)


@pytest.mark.parametrize("url", ["https://proxy.corp:3128", "socks5://proxy.corp:1080", "http://proxy.corp",
                                 "http://proxy.corp:99999", "http://:3128", "http://proxy.corp:3128/path"])
def test_anything_but_an_http_proxy_with_a_port_is_refused(url):
    with pytest.raises(ConfigError, match=r"--proxy must be http://\[USER@\]HOST:PORT"):
        from_option(url, {})


def test_the_option_wins_over_the_environment(no_proxy_variables):
    no_proxy_variables.setenv("https_proxy", "http://other:8080")
    no_proxy_variables.setenv("no_proxy", "gw.example")
    assert for_gateway("flight://gw.example:8445", from_option("http://proxy.corp:3128", {})).shown == \
        "http://proxy.corp:3128"


def test_without_the_option_each_scheme_takes_its_variable_and_no_proxy_is_honoured(no_proxy_variables):
    no_proxy_variables.setenv("HTTP_PROXY", "http://plain.corp:3128")
    no_proxy_variables.setenv("https_proxy", "http://jo:pw@tls.corp:3129")
    no_proxy_variables.setenv("NO_PROXY", "inside.corp,.lan")
    assert for_gateway("ws://gw.example:8443/connect", None).url == "http://plain.corp:3128"
    for url in ("wss://gw.example/connect", "flight://gw.example:8445", "flight+tls://gw.example:8445"):
        proxy = for_gateway(url, None)
        assert proxy.url == "http://jo:pw@tls.corp:3129" and proxy.shown == "http://jo@tls.corp:3129"
    assert for_gateway("flight://inside.corp:8445", None) is None
    assert for_gateway("ws://gw.lan:8443/connect", None) is None
    no_proxy_variables.delenv("HTTP_PROXY")
    assert for_gateway("ws://gw.example:8443/connect", None) is None


def test_a_bad_proxy_variable_is_named_without_its_password(no_proxy_variables):
    no_proxy_variables.setenv("https_proxy", "socks5://jo:hunter2@proxy.corp:1080")
    with pytest.raises(ConfigError, match="the https_proxy variable must be") as refused:
        for_gateway("flight://gw.example:8445", None)
    assert "hunter2" not in str(refused.value)
