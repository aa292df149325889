"""One request followed end to end: the client's x-request-id in the gateway's and the connector's JSON logs."""

from __future__ import annotations

import json

import pyarrow.flight as flight

from poc.workbook.servers.runner import Cluster
from tests.helpers import sales


class ResponseHeaders(flight.ClientMiddlewareFactory):
    """Collects the x-request-id headers the gateway sends back."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []

    def start_call(self, info):
        factory = self

        class Middleware(flight.ClientMiddleware):
            def received_headers(self, headers):
                factory.request_ids += [str(v) for v in headers.get("x-request-id", [])]

        return Middleware()


def json_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def test_a_request_id_travels_from_client_to_connector(tmp_path, tenants, datasets):
    with Cluster(tmp_path, tenants, datasets["small"], with_direct=False, log_format="json") as c:
        headers = [(b"authorization", f"Bearer {tenants['tenant_001'].client_token}".encode()),
                   (b"x-request-id", b"trace-abc-123")]
        seen = ResponseHeaders()
        with flight.connect(c.flight_uri, middleware=[seen]) as client:
            options = flight.FlightCallOptions(headers=headers)
            info = client.get_flight_info(sales(), options)
            assert client.do_get(info.endpoints[0].ticket, options).read_all().num_rows == 20_000
            missing = flight.FlightDescriptor.for_path("dataset", "missing")
            try:
                client.get_flight_info(missing, flight.FlightCallOptions(headers=headers[:1]))
            except KeyError:
                pass
    made_ids = {r for r in seen.request_ids if r != "trace-abc-123"}  # headers and trailers both carry it
    assert "trace-abc-123" in seen.request_ids and len(made_ids) == 1 and made_ids.pop().startswith("req_")
    gateway = json_lines(tmp_path / "logs" / "gateway.log")
    connector = json_lines(tmp_path / "logs" / "connector-tenant_001.log")
    assert all({"time", "level", "logger", "message"} <= set(line) for line in gateway + connector)
    traced_gateway = [line for line in gateway if line.get("request_id") == "trace-abc-123"]
    traced_connector = [line for line in connector if line.get("request_id") == "trace-abc-123"]
    assert {line["message"].split()[0] for line in traced_gateway} == {"get_flight_info", "do_get"}
    assert all(line["tenant"] == "tenant_001" for line in traced_gateway + traced_connector)
    assert [line["message"].split()[0] for line in traced_connector][:2] == ["get_flight_info", "do_get"]
    assert any("stream_id" in line and "sent" in line["message"] for line in traced_connector)
    made = [line["request_id"] for line in gateway if "not_found" in line["message"]]
    assert made and made[0].startswith("req_")  # no header: the gateway makes one
