"""Each request: connect → GetFlightInfo → DoGet, reading and discarding batches; timed per phase."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow.flight as flight
from tqdm import tqdm

from ...config import ConfigError

SUCCESS, ERROR, TIMEOUT = "success", "error", "timeout"


@dataclass
class LoadConfig:
    flight_uri: str
    tokens: dict[str, str]  # tenant_id → client token, in round-robin order
    requests: int = 1000
    concurrency: int = 100
    dataset: str = "sales"
    timeout_s: float = 60.0
    target: str = "tunnel"
    progress: bool | None = None  # None: a bar only on a terminal
    tls_root_certs: bytes | None = None

    def __post_init__(self) -> None:
        if self.requests < 1 or not 1 <= self.concurrency <= 1000 or not self.tokens or self.timeout_s <= 0:
            raise ConfigError("need requests >= 1, 1 <= concurrency <= 1000, at least one tenant, timeout_s > 0")


@dataclass
class RequestRecord:
    """One request, with the seed's field names (websocket_overhead_ms is filled by the analysis)."""

    request_id: str
    tenant_id: str
    target: str
    timestamp: str
    started_s: float
    ended_s: float
    queued_ms: float
    connect_ms: float | None
    metadata_ms: float | None
    data_transfer_ms: float | None
    total_ms: float
    rows_transferred: int
    bytes: int
    status: str
    error: str | None


def read_stream(reader) -> tuple[int, int]:
    """Read a DoGet's stream to its end, discarding the batches: (rows, bytes of their buffers)."""
    rows = size = 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            return rows, size
        rows += chunk.data.num_rows
        size += chunk.data.nbytes


def _status_of(exc: BaseException) -> str:
    return TIMEOUT if isinstance(exc, flight.FlightTimedOutError) or "Deadline Exceeded" in str(exc) else ERROR


def _one_request(cfg: LoadConfig, index: int, tenant_id: str, queued_ms: float, t0: float) -> RequestRecord:
    request_id = f"req-{index:06d}"  # sent as x-request-id: the gateway's and the connector's logs carry it
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {cfg.tokens[tenant_id]}".encode()),
                                                (b"x-request-id", request_id.encode())], timeout=cfg.timeout_s)
    start = time.perf_counter()
    record = RequestRecord(request_id, tenant_id, cfg.target,
                           dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                           start - t0, 0.0, queued_ms, None, None, None, 0.0, 0, 0, SUCCESS, None)
    client = None
    try:
        mark = time.perf_counter()
        client = flight.connect(cfg.flight_uri, tls_root_certs=cfg.tls_root_certs)
        list(client.list_actions(options))  # an authenticated round trip: the channel is up
        record.connect_ms = (time.perf_counter() - mark) * 1000

        mark = time.perf_counter()
        info = client.get_flight_info(flight.FlightDescriptor.for_path("dataset", cfg.dataset), options)
        record.metadata_ms = (time.perf_counter() - mark) * 1000

        mark = time.perf_counter()
        record.rows_transferred, record.bytes = read_stream(client.do_get(info.endpoints[0].ticket, options))
        record.data_transfer_ms = (time.perf_counter() - mark) * 1000
        if info.total_records >= 0 and record.rows_transferred != info.total_records:  # -1: a database's count unknown
            record.status = ERROR
            record.error = f"short stream: {record.rows_transferred} of {info.total_records} rows"
    except Exception as exc:  # every failure becomes a record, never a crash of the run
        record.status = _status_of(exc)
        record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        if client is not None:
            client.close()
    end = time.perf_counter()
    record.total_ms = (end - start) * 1000
    record.ended_s = end - t0
    return record


async def run_load_async(cfg: LoadConfig) -> list[RequestRecord]:
    """Run every request, at most `concurrency` at a time; tenants in round-robin order."""
    tenants = list(cfg.tokens)
    semaphore = asyncio.Semaphore(cfg.concurrency)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.requests, desc=f"{cfg.target} requests", unit="req",
               disable=None if cfg.progress is None else not cfg.progress, leave=False)

    done, step = [0], max(1, cfg.requests // 10)
    with ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="load") as pool:
        async def worker(index: int) -> RequestRecord:
            queued = time.perf_counter()
            async with semaphore:
                queued_ms = (time.perf_counter() - queued) * 1000
                record = await loop.run_in_executor(pool, _one_request, cfg, index, tenants[index % len(tenants)],
                                                    queued_ms, t0)
            bar.update(1)
            done[0] += 1
            if bar.disable and cfg.progress is None and done[0] % step == 0:  # no terminal: a line per 10 %
                print(f"{cfg.target}: {done[0]}/{cfg.requests} requests done", flush=True)
            return record

        try:
            return list(await asyncio.gather(*(worker(i) for i in range(cfg.requests))))
        finally:
            bar.close()


def run_load(cfg: LoadConfig) -> list[RequestRecord]:
    """Blocking wrapper; works inside Jupyter's running loop too (runs in a fresh thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_load_async(cfg))
    with ThreadPoolExecutor(1) as runner:
        return runner.submit(asyncio.run, run_load_async(cfg)).result()


def records_as_dicts(records: list[RequestRecord]) -> list[dict]:
    return [asdict(r) for r in records]
