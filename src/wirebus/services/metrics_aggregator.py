"""Metrics aggregator: turns a benchmark's event records into metrics in a KV store.

    python -m wirebus.services.metrics_aggregator --address ADDRESS [--store PATH]
        [--snapshot-address ADDRESS] [--snapshot-rate HZ] [--history N]

It subscribes to every event at ``ADDRESS``, keeps the metrics below in a
:class:`~wirebus.BasicKVStore` (a fresh one under /dev/shm unless ``--store`` names the path)
and publishes a :class:`MetricsSnapshot` several times a second on a conflating publisher, for
live views that only want the newest numbers. Its ready info carries ``kvstore`` (the store's
path) and ``snapshot_address``.

It subscribes with ``recover=True``: items an hwm drop or a reconnect cost are fetched again
from the publisher's replay buffer. With ``--history`` (default
:data:`~wirebus.services.event_publisher.REPLAY_ITEMS`) it also fetches, from each publisher,
what was published before it joined, in the order sent, so an aggregator started late, or
restarted on a fresh store, computes the metrics of the whole run while the run still fits in
the buffer (what did not fit is counted in its subscriber's ``stats.dropped``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from wirebus._aio import positive_timeout
from wirebus._endpoint import new_ipc_address, remove_ipc_dir
from wirebus.codec import MsgspecCodec
from wirebus.kvstore import BasicKVStore, KVStore, KVStoreReader, SeriesSummary
from wirebus.record import (
    ErrorEventType,
    EventRecord,
    EventRecordCodec,
    SampleEventType,
    SessionEventType,
    TextModelOutput,
)
from wirebus.service import ServiceContext, run_service
from wirebus.services import drain
from wirebus.services._base import HandlerSubscriber
from wirebus.services.event_publisher import REPLAY_ITEMS
from wirebus.transport import ZmqMessagePublisher

__all__ = [
    "COUNTERS",
    "GAUGES",
    "SERIES",
    "MetricsAggregator",
    "MetricsSnapshot",
    "MetricsSnapshotCodec",
    "read_snapshot",
    "wait_for_events",
]

COUNTERS = (
    "events",
    "events_rejected",
    "samples_issued",
    "samples_completed",
    "samples_failed",
    "errors",
    "orphan_events",
    "perf_samples_issued",
    "perf_samples_completed",
    "perf_samples_failed",
    "perf_output_tokens",
)
GAUGES = (
    "in_flight",
    "tracking",
    "elapsed_s",
    "perf_duration_s",
    "perf_samples_per_s",
    "perf_output_tokens_per_s",
)
SERIES = ("ttft_ms", "latency_ms", "tpot_ms", "chunk_gap_ms")

_log = logging.getLogger("wirebus.services.metrics_aggregator")

_LOGGED_REJECTS = 10
_MS = 1e-6  # ns -> ms
_S = 1e-9  # ns -> s


@dataclass
class _Sample:
    issued_ns: int
    tracked: bool
    first_chunk_ns: int | None = None
    chunks_ns: list[int] = field(default_factory=list)


def _problem(record: EventRecord) -> str | None:
    """Why ``record`` cannot be accounted for, or None. Checked before any state changes, so a
    rejected record leaves no trace but its count."""
    data = record.data
    if isinstance(data, TextModelOutput) and data.n_tokens is not None and data.n_tokens < 0:
        return f"n_tokens is negative ({data.n_tokens})"
    return None


class MetricsAggregator:
    """The aggregation itself, apart from any socket: feed it records with :meth:`handle`.

    Metrics (names in :data:`COUNTERS`, :data:`GAUGES`, :data:`SERIES`):

    - ``events``: every record handled, rejected ones included; ``events_rejected``: records
      left out because they cannot be right (a negative ``n_tokens``; the first 10 are
      logged); ``samples_issued/completed/failed``: all samples, warm-up included;
      ``errors``: error events other than a sample failure;
      ``orphan_events``: sample events for a sample not in flight (not issued, or finished).
    - ``perf_samples_issued/completed/failed`` and ``perf_output_tokens``: tracked samples.
    - ``in_flight``: issued, not yet completed or failed; ``tracking``: 1 while tracking;
      ``elapsed_s``: newest event time minus the session start; ``perf_duration_s``: last
      tracked completion minus tracking start; ``perf_samples_per_s`` and
      ``perf_output_tokens_per_s`` over that duration.
    - series, tracked samples only: ``ttft_ms`` (issued to first chunk), ``latency_ms``
      (issued to complete), ``tpot_ms`` (first chunk to complete per output token after the
      first), ``chunk_gap_ms`` (between consecutive chunks, in timestamp order).
    """

    def __init__(self, store: KVStore) -> None:
        self.counters = {name: store.counter(name) for name in COUNTERS}
        self.gauges = {name: store.gauge(name) for name in GAUGES}
        self.series = {name: store.series(name) for name in SERIES}
        self._samples: dict[str, _Sample] = {}
        self._tracking = False
        self._session_start_ns: int | None = None
        self._tracking_start_ns: int | None = None
        self._newest_ns = 0

    def handle(self, records: Iterable[EventRecord]) -> None:
        """Account for ``records``, in order; a record that cannot be right is counted in
        ``events_rejected``, logged and skipped, and the others are accounted for."""
        counters = self.counters
        for record in records:
            counters["events"].inc()
            problem = _problem(record)
            if problem is not None:
                counters["events_rejected"].inc()
                if counters["events_rejected"].value <= _LOGGED_REJECTS:
                    _log.warning("rejected %r: %s", record, problem)
                continue
            event = record.event_type
            if isinstance(event, SampleEventType):
                self._sample_event(record, event)
            elif isinstance(event, SessionEventType):
                self._session_event(record, event)
            elif event is ErrorEventType.SAMPLE_FAILED:
                self._failed(record)
            else:
                counters["errors"].inc()
            if record.timestamp_ns > self._newest_ns:
                self._newest_ns = record.timestamp_ns
        if self._session_start_ns is not None:
            self.gauges["elapsed_s"].set((self._newest_ns - self._session_start_ns) * _S)
        self.gauges["in_flight"].set(len(self._samples))

    def _session_event(self, record: EventRecord, event: SessionEventType) -> None:
        if event is SessionEventType.STARTED:
            self._session_start_ns = record.timestamp_ns
        elif event is SessionEventType.START_PERFORMANCE_TRACKING:
            self._tracking = True
            self._tracking_start_ns = record.timestamp_ns
            self.gauges["tracking"].set(1)
        elif event is SessionEventType.STOP_PERFORMANCE_TRACKING:
            self._tracking = False
            self.gauges["tracking"].set(0)

    def _sample_event(self, record: EventRecord, event: SampleEventType) -> None:
        uuid = record.sample_uuid
        if event is SampleEventType.ISSUED:
            self._samples[uuid] = _Sample(record.timestamp_ns, self._tracking)
            self.counters["samples_issued"].inc()
            if self._tracking:
                self.counters["perf_samples_issued"].inc()
            return
        sample = self._samples.get(uuid)
        if sample is None:
            self.counters["orphan_events"].inc()
        elif event is SampleEventType.FIRST_CHUNK:
            sample.first_chunk_ns = record.timestamp_ns
            sample.chunks_ns.append(record.timestamp_ns)
        elif event is SampleEventType.CHUNK:
            sample.chunks_ns.append(record.timestamp_ns)
        else:
            del self._samples[uuid]
            self._completed(sample, record)

    def _completed(self, sample: _Sample, record: EventRecord) -> None:
        self.counters["samples_completed"].inc()
        if not sample.tracked:
            return
        n_tokens = record.data.n_tokens if isinstance(record.data, TextModelOutput) else None
        n_tokens = n_tokens or 0
        counters, series = self.counters, self.series
        counters["perf_samples_completed"].inc()
        counters["perf_output_tokens"].inc(n_tokens)
        done_ns = record.timestamp_ns
        series["latency_ms"].append((done_ns - sample.issued_ns) * _MS)
        chunks = sorted(sample.chunks_ns)
        first_ns = sample.first_chunk_ns
        if first_ns is None and chunks:
            first_ns = chunks[0]
        if first_ns is not None:
            series["ttft_ms"].append((first_ns - sample.issued_ns) * _MS)
            if n_tokens > 1:
                series["tpot_ms"].append((done_ns - first_ns) * _MS / (n_tokens - 1))
        series["chunk_gap_ms"].extend([(b - a) * _MS for a, b in itertools.pairwise(chunks)])
        self._update_throughput(done_ns)

    def _failed(self, record: EventRecord) -> None:
        sample = self._samples.pop(record.sample_uuid, None)
        if sample is None:
            self.counters["orphan_events"].inc()
            return
        self.counters["samples_failed"].inc()
        if sample.tracked:
            self.counters["perf_samples_failed"].inc()

    def _update_throughput(self, done_ns: int) -> None:
        if self._tracking_start_ns is None:
            return
        duration = (done_ns - self._tracking_start_ns) * _S
        if duration <= 0:
            return
        gauges = self.gauges
        if duration > gauges["perf_duration_s"].value:
            gauges["perf_duration_s"].set(duration)
        duration = gauges["perf_duration_s"].value
        gauges["perf_samples_per_s"].set(self.counters["perf_samples_completed"].value / duration)
        gauges["perf_output_tokens_per_s"].set(self.counters["perf_output_tokens"].value / duration)


class MetricsSnapshot(msgspec.Struct, frozen=True):
    """The aggregator's newest numbers: counters and gauges, and a summary of each series
    (milliseconds for the latencies; NaN statistics for a series with no values yet)."""

    seq: int
    timestamp_ns: int
    values: dict[str, float]
    series: dict[str, SeriesSummary]


class MetricsSnapshotCodec(MsgspecCodec[MetricsSnapshot]):
    """Codec for :class:`MetricsSnapshot` on the ``metrics`` topic."""

    def __init__(self) -> None:
        super().__init__(MetricsSnapshot, topic="metrics")


async def wait_for_events(reader: KVStoreReader, count: int, timeout: float = 10.0) -> int:
    """Return the aggregator's ``events`` count once it reaches ``count``.

    A harness calls this after flushing its publisher, before it reads final metrics: the
    store then holds every event it published. ``TimeoutError``, saying how many were counted,
    when ``timeout`` seconds pass first.
    """
    positive_timeout("timeout", timeout)
    deadline = time.monotonic() + timeout
    counted = int(reader.get("events"))
    while counted < count:
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"the store at {reader.path!r} counted {counted} of {count} events "
                f"within {timeout} s"
            )
        await asyncio.sleep(0.01)  # polling the store: a writer in another process, no event
        counted = int(reader.get("events"))
    return counted


def read_snapshot(reader: KVStoreReader, seq: int = 0) -> MetricsSnapshot:
    """Build a :class:`MetricsSnapshot` from the store behind ``reader``."""
    values: dict[str, float] = {}
    series: dict[str, SeriesSummary] = {}
    for name, value in reader.snapshot().items():
        if isinstance(value, SeriesSummary):
            series[name] = value
        else:
            values[name] = value
    return MetricsSnapshot(seq, time.monotonic_ns(), values, series)


async def _serve(service: ServiceContext, args: argparse.Namespace) -> None:
    store = BasicKVStore(args.store)
    snapshot_address = args.snapshot_address or new_ipc_address("metrics")
    try:
        aggregator = MetricsAggregator(store)
        reader = KVStoreReader(store.path)
        snapshots = ZmqMessagePublisher(
            MetricsSnapshotCodec(), snapshot_address, conflate=True, linger=0
        )
        events = HandlerSubscriber(
            EventRecordCodec(), args.address, aggregator.handle, recover=True, history=args.history
        )
        try:
            await events.start()
            service.ready({"kvstore": str(store.path), "snapshot_address": snapshots.address})
            seq = 0
            while not service.stop_requested:
                seq += 1
                snapshots.publish(read_snapshot(reader, seq))
                try:
                    await asyncio.wait_for(service.stopped(), 1 / args.snapshot_rate)
                except asyncio.TimeoutError:
                    continue
            await drain(events)
            snapshots.publish(read_snapshot(reader, seq + 1))
        finally:
            await events.aclose()
            snapshots.close()
            reader.close()
    finally:
        store.close()
        if args.store is None:
            store.unlink()
        if not args.snapshot_address:
            remove_ipc_dir(snapshot_address)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wirebus.services.metrics_aggregator")
    parser.add_argument("--address", required=True, help="the event publisher's address")
    parser.add_argument("--store", help="KV store path (default: a fresh one under /dev/shm)")
    parser.add_argument("--snapshot-address", help="where to publish MetricsSnapshot")
    parser.add_argument("--snapshot-rate", type=float, default=4.0, help="snapshots per second")
    parser.add_argument(
        "--history",
        type=int,
        default=REPLAY_ITEMS,
        help="items of history to fetch from each publisher on its first message",
    )
    args = parser.parse_args(argv)
    if args.snapshot_rate <= 0:
        parser.error(f"--snapshot-rate must be > 0, got {args.snapshot_rate}")
    if args.history < 0:
        parser.error(f"--history must be >= 0, got {args.history}")

    async def serve(service: ServiceContext) -> None:
        await _serve(service, args)

    run_service(serve)


if __name__ == "__main__":
    main()
