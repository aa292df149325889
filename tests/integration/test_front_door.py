"""What the gateway refuses at its Flight port before any tunnel is involved: malformed descriptors, missing or
wrong tokens, tickets of another tenant or altered. These do not depend on the tunnel's transport, so they run
once, on one cluster, not once per transport (test_errors.py has the errors that cross a tunnel)."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from poc.workbook.servers.runner import Cluster
from tests.helpers import bearer, sales


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, datasets):
    from poc.config import make_tenants

    with Cluster(tmp_path_factory.mktemp("front-door"), make_tenants(2), datasets["a"], with_direct=False) as c:
        yield c


@pytest.fixture(scope="module")
def tenants(cluster):
    return cluster.tenants


def test_descriptor_must_name_a_dataset(cluster, tenants):
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(pa.ArrowInvalid, match=r'\["dataset", "<name>"\]'):
            client.get_flight_info(flight.FlightDescriptor.for_path("sales"), bearer(tenants["tenant_001"].client_token))


@pytest.mark.parametrize("headers", [
    [],
    [(b"authorization", b"Bearer not-a-token")],
    [(b"authorization", b"Basic dXNlcjpwdw==")],
], ids=["missing", "wrong", "not-bearer"])
def test_bad_or_missing_client_token_is_unauthenticated(cluster, headers):
    with flight.connect(cluster.flight_uri) as client:
        with pytest.raises(flight.FlightUnauthenticatedError):
            client.get_flight_info(sales(), flight.FlightCallOptions(headers=headers, timeout=10))
        with pytest.raises(flight.FlightUnauthenticatedError):
            list(client.list_flights(options=flight.FlightCallOptions(headers=headers, timeout=10)))


def test_tenant_id_header_must_agree_with_the_token(cluster, tenants):
    token = tenants["tenant_001"].client_token
    with flight.connect(cluster.flight_uri) as client:
        assert client.get_flight_info(sales(), bearer(token, "tenant_001")).total_records == 200_000
        with pytest.raises(flight.FlightUnauthenticatedError, match="tenant-id"):
            client.get_flight_info(sales(), bearer(token, "tenant_002"))


def test_another_tenants_ticket_is_refused(cluster, tenants):
    with flight.connect(cluster.flight_uri) as client:
        info = client.get_flight_info(sales(), bearer(tenants["tenant_001"].client_token))
        with pytest.raises(flight.FlightUnauthorizedError, match="another tenant"):
            client.do_get(info.endpoints[0].ticket, bearer(tenants["tenant_002"].client_token)).read_all()


def test_altered_ticket_is_refused(cluster, tenants):
    token = tenants["tenant_002"].client_token
    with flight.connect(cluster.flight_uri) as client:
        ticket = client.get_flight_info(sales(), bearer(token)).endpoints[0].ticket.ticket
        body_b64, mac = ticket.split(b".")
        body = json.loads(base64.urlsafe_b64decode(body_b64))
        forged = base64.urlsafe_b64encode(json.dumps({**body, "d": "orders"}).encode()) + b"." + mac
        for bad in (forged, b"garbage", ticket[:-4] + b"AAAA"):
            with pytest.raises(flight.FlightUnauthorizedError):
                client.do_get(flight.Ticket(bad), bearer(token)).read_all()
