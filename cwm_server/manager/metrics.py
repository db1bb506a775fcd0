"""Prometheus metrics of one manager, served at http://HOST:PORT/metrics (`--metrics`).

Each manager has its own registry (tests run several in one process). What is counted:

- per RPC (label ``method``, e.g. ``cwm.v1.WindowService/Freeze``):
  ``cwm_rpc_duration_seconds{method,code}`` (a histogram: for a stream, open to close),
  ``cwm_rpc_received_messages_total`` / ``cwm_rpc_sent_messages_total`` and
  ``cwm_rpc_received_message_bytes_total`` / ``cwm_rpc_sent_message_bytes_total`` (serialized
  protobuf bytes, all message kinds), and for messages carrying a ``cwm.v1.Chunk``:
  ``cwm_rpc_received_chunk_bytes_total`` / ``cwm_rpc_sent_chunk_bytes_total`` (the bytes of
  ``Chunk.data`` over all parts, i.e. chunk payload as it crosses the wire, after any codec)
  and ``cwm_rpc_received_chunks_total`` / ``cwm_rpc_sent_chunks_total`` (chunks, counted at
  their first part); ``cwm_streams_in_flight{method}``;
- the store: ``cwm_chunk_verify_seconds{op="store"|"load"}`` (BLAKE3 checks; a memory-tier
  load is its XXH3 seal check),
  ``cwm_chunk_store_seconds`` (compress + durable write), ``cwm_chunk_load_seconds{tier}``,
  ``cwm_tier_hits_total{tier}``, ``cwm_tier_misses_total{tier}``,
  ``cwm_redis_copies_skipped_total{reason}`` (write-through copies Redis could not take),
  ``cwm_tier_bytes{tier}`` (memory: bytes held; disk: bytes of chunk files the catalog
  references), ``cwm_tier_capacity_bytes{tier="memory"}``,
  ``cwm_tier_evictions_total{tier="memory"}``,
  ``cwm_tier_corrupt_dropped_total{tier="memory"}``;
- the catalog, per tenant: ``cwm_windows{tenant}``, ``cwm_tenant_chunks{tenant}``,
  ``cwm_tenant_raw_bytes{tenant}`` and ``cwm_tenant_stored_bytes{tenant}`` (distinct chunks:
  a clone adds a window, not bytes);
- the bulk channel: ``cwm_bulk_transfers_total{transport,direction}`` and
  ``cwm_bulk_bytes_total{transport,direction}`` (transfers that ran on a bulk connection and
  the chunk bytes they moved), ``cwm_bulk_fallbacks_total{direction}`` (offers no connection
  took in time: the transfer went on over gRPC), ``cwm_bulk_refused_total{transport,reason}``
  (connections closed without a byte: no hello, bad magic, unknown, reused or expired
  ticket, a foreign Unix peer, too many pending);
- ``cwm_agents_connected``; ``cwm_health_level{component}`` (0 OK, 1 DEGRADED, 2 DOWN).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from threading import Thread
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cwm_client import pb
from cwm_server.manager.tiers.store import StoreObserver

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
RPC_BUCKETS = (0.001, 0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
CHUNK_DESCRIPTOR = pb.Chunk.DESCRIPTOR


def method_label(full_method: str) -> str:
    """'/cwm.v1.WindowService/Freeze' -> 'cwm.v1.WindowService/Freeze'."""
    return full_method.lstrip("/")


def chunk_of(message: Any) -> pb.Chunk | None:
    """The cwm.v1.Chunk a message carries in a field named `chunk`, if any."""
    descriptor = getattr(message, "DESCRIPTOR", None)
    if descriptor is None:
        return None
    field = descriptor.fields_by_name.get("chunk")
    if field is None or field.message_type is not CHUNK_DESCRIPTOR:
        return None
    if not message.HasField("chunk"):
        return None
    chunk: pb.Chunk = message.chunk
    return chunk


_CHUNK_DATA_FIELD = CHUNK_DESCRIPTOR.fields_by_name["data"].number


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _last_field(buf: bytes, start: int, end: int, number: int) -> tuple[int, int] | None:
    """(start, end) of the last length-delimited field `number` in buf[start:end]."""
    pos, found = start, None
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if key >> 3 == number:
                found = (pos, pos + size)
            pos += size
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return None
    return found


def chunk_data_size(message: Any, chunk: pb.Chunk, serialized: Any) -> int:
    """len(chunk.data) of the Chunk that `message` carries, read off the message's
    serialized bytes (the wire format's length prefix) when they are at hand: reading a
    bytes field of a upb message copies it, a MiB per chunk part, on the event loop."""
    if isinstance(serialized, bytes):
        try:
            outer = _last_field(
                serialized, 0, len(serialized), message.DESCRIPTOR.fields_by_name["chunk"].number
            )
            if outer is not None:
                data = _last_field(serialized, outer[0], outer[1], _CHUNK_DATA_FIELD)
                return 0 if data is None else data[1] - data[0]
        except (IndexError, KeyError):
            pass
    return len(chunk.data)


class RpcMetrics:
    """What the RPC interceptor records."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "cwm_rpc_duration_seconds",
            "Time from the start of an RPC to its status; for a stream, open to close.",
            ["method", "code"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "cwm_streams_in_flight", "Streaming RPCs open now.", ["method"], registry=registry
        )
        self.messages_in = Counter(
            "cwm_rpc_received_messages", "Request messages received.", ["method"], registry=registry
        )
        self.messages_out = Counter(
            "cwm_rpc_sent_messages", "Response messages sent.", ["method"], registry=registry
        )
        self.message_bytes_in = Counter(
            "cwm_rpc_received_message_bytes",
            "Serialized bytes of the request messages received.",
            ["method"],
            registry=registry,
        )
        self.message_bytes_out = Counter(
            "cwm_rpc_sent_message_bytes",
            "Serialized bytes of the response messages sent.",
            ["method"],
            registry=registry,
        )
        self.chunk_bytes_in = Counter(
            "cwm_rpc_received_chunk_bytes",
            "Chunk.data bytes received (all parts; encoded, as on the wire).",
            ["method"],
            registry=registry,
        )
        self.chunk_bytes_out = Counter(
            "cwm_rpc_sent_chunk_bytes",
            "Chunk.data bytes sent (all parts; encoded, as on the wire).",
            ["method"],
            registry=registry,
        )
        self.chunks_in = Counter(
            "cwm_rpc_received_chunks",
            "Chunks received (counted at their first part).",
            ["method"],
            registry=registry,
        )
        self.chunks_out = Counter(
            "cwm_rpc_sent_chunks",
            "Chunks sent (counted at their first part).",
            ["method"],
            registry=registry,
        )


class CallMetrics:
    """One RPC's recorder: the labelled children are looked up once per call."""

    __slots__ = (
        "_chunk_bytes_in",
        "_chunk_bytes_out",
        "_chunks_in",
        "_chunks_out",
        "_label",
        "_metrics",
        "_msg_bytes_in",
        "_msg_bytes_out",
        "_msgs_in",
        "_msgs_out",
    )

    def __init__(self, metrics: RpcMetrics, label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._msgs_in = metrics.messages_in.labels(label)
        self._msgs_out = metrics.messages_out.labels(label)
        self._msg_bytes_in = metrics.message_bytes_in.labels(label)
        self._msg_bytes_out = metrics.message_bytes_out.labels(label)
        self._chunk_bytes_in = metrics.chunk_bytes_in.labels(label)
        self._chunk_bytes_out = metrics.chunk_bytes_out.labels(label)
        self._chunks_in = metrics.chunks_in.labels(label)
        self._chunks_out = metrics.chunks_out.labels(label)

    def received(self, message: Any, raw: Any) -> None:
        """One request message; `raw`: the bytes it was parsed from (counted as 0 bytes
        when not bytes)."""
        self._msgs_in.inc()
        self._msg_bytes_in.inc(len(raw) if isinstance(raw, bytes) else 0)
        chunk = chunk_of(message)
        if chunk is not None:
            self._chunk_bytes_in.inc(chunk_data_size(message, chunk, raw))
            if chunk.data_offset == 0:
                self._chunks_in.inc()

    def sent(self, message: Any, serialized: Any = None) -> None:
        """One response message; `serialized`: its bytes as they go on the wire (the
        interceptor counts in the response serializer, so no message is sized twice)."""
        self._msgs_out.inc()
        if isinstance(serialized, bytes):
            size = len(serialized)
        else:
            size = message.ByteSize() if hasattr(message, "ByteSize") else 0
        self._msg_bytes_out.inc(size)
        chunk = chunk_of(message)
        if chunk is not None:
            self._chunk_bytes_out.inc(chunk_data_size(message, chunk, serialized))
            if chunk.data_offset == 0:
                self._chunks_out.inc()

    def sent_encoded(self, size: int, chunk_bytes: int, first_part: bool) -> None:
        """One response sent pre-encoded (wire.PreEncoded): the sizes are known."""
        self._msgs_out.inc()
        self._msg_bytes_out.inc(size)
        self._chunk_bytes_out.inc(chunk_bytes)
        if first_part:
            self._chunks_out.inc()

    def stream_opened(self) -> None:
        self._metrics.in_flight.labels(self._label).inc()

    def stream_closed(self) -> None:
        self._metrics.in_flight.labels(self._label).dec()

    def finished(self, code: str, seconds: float) -> None:
        self._metrics.duration.labels(self._label, code).observe(seconds)


class StoreMetrics(StoreObserver):
    """The chunk store's hooks, as Prometheus histograms and counters."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._verify = Histogram(
            "cwm_chunk_verify_seconds",
            "Verification of one chunk's raw bytes: BLAKE3, or for a memory-tier load the "
            "XXH3 seal taken when its BLAKE3-checked bytes entered the tier.",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._store = Histogram(
            "cwm_chunk_store_seconds",
            "Storing one verified chunk: compression (when it pays) and the durable write.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._load = Histogram(
            "cwm_chunk_load_seconds",
            "Reading one chunk from a tier, decoded and verified.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._hits = Counter(
            "cwm_tier_hits", "Chunks a tier held when asked.", ["tier"], registry=registry
        )
        self._misses = Counter(
            "cwm_tier_misses", "Chunks a tier did not hold when asked.", ["tier"], registry=registry
        )
        self._redis_skips = Counter(
            "cwm_redis_copies_skipped",
            "Best-effort Redis copies of chunks skipped (Redis away or refusing), by reason.",
            ["reason"],
            registry=registry,
        )
        self._corrupt = Counter(
            "cwm_chunks_corrupt",
            "Chunk copies that failed their check on a read, by tier (a disk copy is "
            "quarantined: the next freeze or import of the same bytes repairs it).",
            ["tier"],
            registry=registry,
        )
        self._corrupt.labels("disk")
        for tier in ("memory", "disk"):
            self._hits.labels(tier)
            self._misses.labels(tier)
            self._load.labels(tier)
        for op in ("store", "load"):
            self._verify.labels(op)

    def verified(self, op: str, seconds: float) -> None:
        self._verify.labels(op).observe(seconds)

    def stored(self, seconds: float) -> None:
        self._store.observe(seconds)

    def hit(self, tier: str, seconds: float) -> None:
        self._hits.labels(tier).inc()
        self._load.labels(tier).observe(seconds)

    def miss(self, tier: str) -> None:
        self._misses.labels(tier).inc()

    def redis_skipped(self, reason: str) -> None:
        self._redis_skips.labels(reason or "UNKNOWN").inc()

    def corrupt(self, tier: str) -> None:
        self._corrupt.labels(tier).inc()


class StateCollector(Collector):
    """Gauges read at scrape time: tiers, catalog per tenant, agents, health."""

    def __init__(
        self,
        catalog_path: Path,
        memory: Any,
        agent_count: Callable[[], int],
        health_levels: Callable[[], Iterable[tuple[str, int]]],
    ) -> None:
        self._catalog_path = catalog_path
        self._memory = memory
        self._agent_count = agent_count
        self._health_levels = health_levels

    def _tenants(self) -> tuple[list[tuple[str, int]], list[tuple[str, int, int, int]]]:
        """Per-tenant rows from a read-only connection of our own: the scrape runs on the
        HTTP server's thread, and WAL lets it read while the manager writes."""
        if not self._catalog_path.exists():
            return [], []
        db = sqlite3.connect(f"file:{self._catalog_path}?mode=ro", uri=True, timeout=5)
        try:
            windows = db.execute("SELECT tenant, COUNT(*) FROM windows GROUP BY tenant").fetchall()
            chunks = db.execute(
                "SELECT tenant, COUNT(*), SUM(raw_size), SUM(stored_size) FROM chunks "
                "GROUP BY tenant"
            ).fetchall()
        finally:
            db.close()
        return windows, chunks

    def collect(self) -> Iterable[Metric]:
        tier_bytes = GaugeMetricFamily("cwm_tier_bytes", "Bytes a tier holds now.", labels=["tier"])
        tier_bytes.add_metric(["memory"], self._memory.held_bytes)
        capacity = GaugeMetricFamily(
            "cwm_tier_capacity_bytes", "Byte cap of a tier.", labels=["tier"]
        )
        capacity.add_metric(["memory"], self._memory.capacity_bytes)
        evictions = CounterMetricFamily(
            "cwm_tier_evictions", "Chunks dropped from a tier to make room.", labels=["tier"]
        )
        evictions.add_metric(["memory"], self._memory.evictions)
        corrupt = CounterMetricFamily(
            "cwm_tier_corrupt_dropped",
            "Entries dropped from a tier because their bytes changed after they were "
            "verified (the read then fell through to the tiers below).",
            labels=["tier"],
        )
        corrupt.add_metric(["memory"], self._memory.corrupt)

        windows_g = GaugeMetricFamily("cwm_windows", "Windows per tenant.", labels=["tenant"])
        chunks_g = GaugeMetricFamily(
            "cwm_tenant_chunks", "Distinct chunks a tenant's windows reference.", labels=["tenant"]
        )
        raw_g = GaugeMetricFamily(
            "cwm_tenant_raw_bytes",
            "Raw bytes of the distinct chunks of a tenant.",
            labels=["tenant"],
        )
        stored_g = GaugeMetricFamily(
            "cwm_tenant_stored_bytes",
            "Bytes the distinct chunks of a tenant occupy on disk.",
            labels=["tenant"],
        )
        windows, chunks = self._tenants()
        for tenant, count in windows:
            windows_g.add_metric([tenant], count)
        disk_total = 0
        for tenant, count, raw, stored in chunks:
            chunks_g.add_metric([tenant], count)
            raw_g.add_metric([tenant], raw or 0)
            stored_g.add_metric([tenant], stored or 0)
            disk_total += stored or 0
        tier_bytes.add_metric(["disk"], disk_total)

        agents = GaugeMetricFamily("cwm_agents_connected", "Host agents connected now.")
        agents.add_metric([], self._agent_count())
        health = GaugeMetricFamily(
            "cwm_health_level",
            "Condition of a manager component: 0 OK, 1 DEGRADED, 2 DOWN.",
            labels=["component"],
        )
        for component, level in self._health_levels():
            health.add_metric([component], level)
        yield from (tier_bytes, capacity, evictions, corrupt, windows_g, chunks_g, raw_g, stored_g)
        yield from (agents, health)


class BulkMetrics:
    """The bulk channel's counters (see the module docstring)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._transfers = Counter(
            "cwm_bulk_transfers",
            "Transfers that ran on a bulk connection",
            ["transport", "direction"],
            registry=registry,
        )
        self._bytes = Counter(
            "cwm_bulk_bytes",
            "Chunk bytes moved on bulk connections",
            ["transport", "direction"],
            registry=registry,
        )
        self._fallbacks = Counter(
            "cwm_bulk_fallbacks",
            "Bulk offers no connection took in time (the transfer went on over gRPC)",
            ["direction"],
            registry=registry,
        )
        self._refused = Counter(
            "cwm_bulk_refused",
            "Bulk connections closed without a byte",
            ["transport", "reason"],
            registry=registry,
        )

    def transferred(self, transport: str, direction: str, size: int) -> None:
        self._transfers.labels(transport, direction).inc()
        self._bytes.labels(transport, direction).inc(size)

    def fallback(self, direction: str) -> None:
        self._fallbacks.labels(direction).inc()

    def refused(self, transport: str, reason: str) -> None:
        self._refused.labels(transport, reason).inc()


class ManagerMetrics:
    """The registry of one manager and, once started, its HTTP endpoint."""

    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they double the page for nothing
        self.registry = CollectorRegistry()
        self.rpc = RpcMetrics(self.registry)
        self.store = StoreMetrics(self.registry)
        self.bulk = BulkMetrics(self.registry)
        self._http: Any = None
        self._thread: Thread | None = None
        self.port = 0

    def add_state(self, collector: StateCollector) -> None:
        self.registry.register(collector)

    def serve(self, listen: str) -> int:
        """Serve /metrics on HOST:PORT (port 0: any); returns the bound port."""
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"--metrics expects HOST:PORT, got {listen!r}")
        self._http, self._thread = start_http_server(
            int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry
        )
        self.port = int(self._http.server_port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
