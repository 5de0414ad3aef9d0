"""The reference services: the aggregator's arithmetic, the logger's files, both under the
real launcher with a real publisher."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest

from wirebus import (
    EventRecord,
    PromptData,
    SampleEventType,
    ServiceLauncher,
    ServiceSpec,
    SessionEventType,
    TextModelOutput,
    make_topic,
)
from wirebus.kvstore import BasicKVStore, KVStoreReader
from wirebus.record import ErrorData, ErrorEventType, EventRecordCodec
from wirebus.services import drain
from wirebus.services._base import HandlerSubscriber
from wirebus.services.event_logger import JsonLinesWriter, log_files
from wirebus.services.event_publisher import EventPublisherService
from wirebus.services.metrics_aggregator import (
    COUNTERS,
    GAUGES,
    SERIES,
    MetricsAggregator,
    MetricsSnapshotCodec,
    read_snapshot,
    wait_for_events,
)

MS = 1_000_000


def _r(event: object, at_ms: float, uuid: str = "", data: object = None) -> EventRecord:
    return EventRecord(event, int(at_ms * MS), uuid, data)  # type: ignore[arg-type]


def _out(n_tokens: int) -> TextModelOutput:
    return TextModelOutput(n_tokens=n_tokens)


SCRIPT = [
    _r(SessionEventType.STARTED, 0),
    # warm-up: counted in the totals only
    _r(SampleEventType.ISSUED, 1, "w1"),
    _r(SampleEventType.FIRST_CHUNK, 11, "w1"),
    _r(SampleEventType.COMPLETE, 21, "w1", _out(3)),
    _r(SessionEventType.START_PERFORMANCE_TRACKING, 100),
    _r(SampleEventType.ISSUED, 100, "a", PromptData(text="hi")),
    _r(SampleEventType.ISSUED, 110, "b"),
    _r(SampleEventType.ISSUED, 120, "c"),
    # a's chunks arrive out of timestamp order
    _r(SampleEventType.CHUNK, 160, "a"),
    _r(SampleEventType.FIRST_CHUNK, 130, "a"),
    _r(SampleEventType.CHUNK, 145, "a"),
    _r(SampleEventType.COMPLETE, 200, "a", _out(9)),
    _r(SampleEventType.FIRST_CHUNK, 150, "b"),
    _r(SampleEventType.COMPLETE, 190, "b", _out(5)),
    _r(ErrorEventType.SAMPLE_FAILED, 170, "c", ErrorData("Timeout", "no answer")),
    _r(SessionEventType.STOP_PERFORMANCE_TRACKING, 210),
    # after tracking: totals only
    _r(SampleEventType.ISSUED, 220, "late"),
    _r(SampleEventType.COMPLETE, 230, "late", _out(2)),
    _r(SampleEventType.CHUNK, 240, "never-issued"),
    _r(ErrorEventType.GENERIC, 250),
    _r(SessionEventType.ENDED, 300),
]


def test_aggregator_metrics_match_hand_computed_values(tmp_path: Path) -> None:
    with BasicKVStore(tmp_path / "store") as store:
        aggregator = MetricsAggregator(store)
        aggregator.handle(SCRIPT[:10])  # in two batches: state carries over
        aggregator.handle(SCRIPT[10:])
        with KVStoreReader(store.path) as reader:
            got = {name: reader.get(name) for name in (*COUNTERS, *GAUGES)}
            series = {name: list(reader.series(name).values()) for name in SERIES}
    assert got == {
        "events": len(SCRIPT),
        "events_rejected": 0,
        "samples_issued": 5,
        "samples_completed": 4,
        "samples_failed": 1,
        "errors": 1,
        "orphan_events": 1,
        "perf_samples_issued": 3,
        "perf_samples_completed": 2,
        "perf_samples_failed": 1,
        "perf_output_tokens": 14,
        "in_flight": 0,
        "tracking": 0,
        "elapsed_s": pytest.approx(0.3),
        "perf_duration_s": pytest.approx(0.1),  # tracking start (100) to a's completion (200)
        "perf_samples_per_s": pytest.approx(20),
        "perf_output_tokens_per_s": pytest.approx(140),
    }
    assert series["ttft_ms"] == pytest.approx([30, 40])
    assert series["latency_ms"] == pytest.approx([100, 80])
    assert series["tpot_ms"] == pytest.approx([70 / 8, 40 / 4])
    assert series["chunk_gap_ms"] == pytest.approx([15, 15])


def test_aggregator_rejects_a_bad_record_alone_and_counts_it(tmp_path: Path) -> None:
    with BasicKVStore(tmp_path / "store") as store:
        aggregator = MetricsAggregator(store)
        aggregator.handle(
            [
                _r(SessionEventType.START_PERFORMANCE_TRACKING, 0),
                _r(SampleEventType.ISSUED, 1, "a"),
                _r(SampleEventType.ISSUED, 2, "b"),
                _r(SampleEventType.ISSUED, 3, "c"),
                _r(SampleEventType.COMPLETE, 10, "a", _out(4)),
                _r(SampleEventType.COMPLETE, 11, "b", _out(-5)),
                _r(SampleEventType.COMPLETE, 12, "c", _out(2)),
            ]
        )
        with KVStoreReader(store.path) as reader:
            got = {name: reader.get(name) for name in (*COUNTERS, *GAUGES)}
            latencies = list(reader.series("latency_ms").values())
    assert got["events"] == 7
    assert got["events_rejected"] == 1
    assert got["samples_completed"] == 2
    assert got["perf_output_tokens"] == 6
    assert got["in_flight"] == 1  # b: its only completion was rejected
    assert latencies == pytest.approx([9, 9])


def test_aggregator_in_flight_and_snapshot(tmp_path: Path) -> None:
    with BasicKVStore(tmp_path / "store") as store:
        aggregator = MetricsAggregator(store)
        aggregator.handle(SCRIPT[:8])
        with KVStoreReader(store.path) as reader:
            snapshot = read_snapshot(reader, seq=7)
    assert snapshot.seq == 7
    assert snapshot.values["in_flight"] == 3
    assert snapshot.values["tracking"] == 1
    assert snapshot.series["latency_ms"].count == 0
    codec = MetricsSnapshotCodec()
    topic, payload = codec.encode(snapshot)
    assert topic == make_topic("metrics")
    assert codec.encode(codec.decode(payload))[1] == payload  # NaN != NaN: compare the bytes


def test_json_lines_writer_rotates_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(path, max_bytes=400)
    for start in range(0, len(SCRIPT), 3):
        writer.write(SCRIPT[start : start + 3])
    writer.close()
    files = log_files(path)
    assert len(files) > 2
    assert files[-1] == str(path)
    decoder = msgspec.json.Decoder(EventRecord, dec_hook=_event_hook())
    lines = [line for f in files for line in Path(f).read_bytes().splitlines()]
    assert [decoder.decode(line) for line in lines] == SCRIPT
    assert writer.written == len(SCRIPT)


def _count_lines(log: Path) -> int:
    return sum(len(Path(f).read_bytes().splitlines()) for f in log_files(log))


def _event_hook() -> object:
    from wirebus.record import EventRecordCodec

    return EventRecordCodec()._dec_hook


def test_json_lines_writer_rejects_bad_max_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 1, got 0"):
        JsonLinesWriter(tmp_path / "x.jsonl", max_bytes=0)


async def test_services_record_everything_published(tmp_path: Path, wirebus_address: str) -> None:
    store_path = tmp_path / "store"
    log = tmp_path / "events.jsonl"
    n = 3000
    async with EventPublisherService(wirebus_address) as events:
        async with ServiceLauncher(ready_timeout=30, stop_timeout=10) as launcher:
            ready = await launcher.start(
                [
                    ServiceSpec(
                        "logger",
                        [sys.executable, "-m", "wirebus.services.event_logger",
                         "--address", wirebus_address, "--out", str(log), "--max-bytes", "50000"],
                    ),
                    ServiceSpec(
                        "aggregator",
                        [sys.executable, "-m", "wirebus.services.metrics_aggregator",
                         "--address", wirebus_address, "--store", str(store_path)],
                    ),
                ]
            )  # fmt: skip
            assert ready["logger"].info == {"path": str(log)}
            assert ready["aggregator"].info["kvstore"] == str(store_path)
            await events.wait_for_subscribers(2, timeout=10)
            events.session_started()
            events.start_tracking()
            for i in range(n):
                events.issued(f"s{i}")
                events.complete(f"s{i}", n_tokens=4)
            events.session_ended()
            await events.flush(timeout=10)
            with KVStoreReader(store_path) as reader:
                assert await wait_for_events(reader, events.published) == events.published
                assert reader.get("perf_samples_completed") == n
            codes = await launcher.stop()
        assert codes == {"logger": 0, "aggregator": 0}
    assert _count_lines(log) == 2 * n + 3
    with KVStoreReader(store_path) as reader:  # a store it was given stays, closed and whole
        assert reader.get("events") == events.published


async def test_wait_for_events_raises_timeout_error_saying_how_many(tmp_path: Path) -> None:
    with BasicKVStore(tmp_path / "store") as store:
        MetricsAggregator(store).handle(SCRIPT[:3])
        with KVStoreReader(store.path) as reader:
            assert await wait_for_events(reader, 3, timeout=1) == 3
            with pytest.raises(TimeoutError, match="counted 3 of 5 events"):
                await wait_for_events(reader, 5, timeout=0.2)


def test_event_publisher_service_closes_with_a_plain_with(wirebus_address: str) -> None:
    with EventPublisherService(wirebus_address) as events:
        events.session_started()
        assert events.published == 1
    with pytest.raises(RuntimeError):
        events.session_ended()


async def test_drain_waits_for_what_is_on_its_way(wirebus_address: str) -> None:
    received: list[EventRecord] = []
    async with EventPublisherService(wirebus_address) as events:
        subscriber = HandlerSubscriber(EventRecordCodec(), wirebus_address, received.extend)
        async with subscriber:
            await subscriber.start()
            await events.wait_for_subscribers(1, timeout=10)
            for i in range(2000):
                events.issued(f"s{i}")
            await events.flush(timeout=10)
            await drain(subscriber, quiet=0.2)
            assert len(received) == 2000
    with pytest.raises(ValueError, match="quiet"):
        await drain(subscriber, quiet=0)
