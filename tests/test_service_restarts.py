"""Reference services killed and started again (issue 12): the event logger's checkpoint, cut
back with ``restore()``; a real logger process SIGKILLed mid-stream that still logs every record
once; a real aggregator SIGKILLed and restarted on a fresh store that rebuilds the same metrics
from the publisher's history."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from _support import wait_until_async
from wirebus import (
    EventRecord,
    SampleEventType,
    ServiceLauncher,
    ServiceSpec,
    SessionEventType,
    TextModelOutput,
    ZmqMessagePublisher,
    make_topic,
)
from wirebus.kvstore import BasicKVStore, KVStoreReader
from wirebus.record import EventRecordCodec
from wirebus.services.event_logger import (
    JsonLinesWriter,
    Resume,
    checkpoint_path,
    log_files,
    restore,
)
from wirebus.services.event_publisher import EventPublisherService
from wirebus.services.metrics_aggregator import MetricsAggregator, wait_for_events
from wirebus.transport import Position

TOPIC = make_topic("sample")
_decode = msgspec.json.Decoder(EventRecord, dec_hook=EventRecordCodec()._dec_hook).decode


def issued(start: int, stop: int) -> list[EventRecord]:
    return [EventRecord(SampleEventType.ISSUED, i, f"s{i}") for i in range(start, stop)]


def logged(path: Path) -> list[EventRecord]:
    return [_decode(line) for f in log_files(path) for line in Path(f).read_bytes().splitlines()]


def test_restore_without_a_checkpoint_leaves_the_log_alone(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(path)
    writer.write(issued(0, 10))
    writer.close()
    assert restore(path) == Resume({}, {})
    assert logged(path) == issued(0, 10)


def test_restore_cuts_the_log_back_to_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    position: Position = {(7, TOPIC): 10, (2**64 - 1, make_topic("other")): 3}
    writer = JsonLinesWriter(path)
    endpoints = {7: "ipc:///run/x.sock.replay", 2**64 - 1: "tcp://10.0.0.5:41234"}
    writer.write(issued(0, 10))
    writer.checkpoint(position, endpoints)
    writer.write(issued(10, 15))  # after the checkpoint: due again after a restart
    writer.close()
    assert restore(path) == Resume(position, endpoints)
    assert logged(path) == issued(0, 10)
    assert restore(path) == Resume(position, endpoints)  # twice is the same
    assert logged(path) == issued(0, 10)


def test_restore_puts_back_a_file_rotated_after_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(path, max_bytes=500)
    for start in range(0, 20, 2):
        writer.write(issued(start, start + 2))
    files = len(log_files(path))
    writer.checkpoint({(1, TOPIC): 20})
    for start in range(20, 60, 2):  # several rotations after the checkpoint
        writer.write(issued(start, start + 2))
    writer.close()
    assert len(log_files(path)) > files + 1
    assert restore(path).position == {(1, TOPIC): 20}
    assert len(log_files(path)) == files
    assert logged(path) == issued(0, 20)
    assert not os.path.exists(f"{path}.{files}")  # the later rotated files are gone
    writer = JsonLinesWriter(path, max_bytes=500)  # and a new writer carries on from there
    writer.write(issued(20, 30))
    writer.close()
    assert logged(path) == issued(0, 30)


def test_restore_refuses_a_checkpoint_it_cannot_trust(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = JsonLinesWriter(path)
    writer.write(issued(0, 10))
    writer.checkpoint({})
    writer.close()
    os.truncate(path, 100)  # someone else cut the log
    cut = r"0 rotated files and 100 bytes, but its checkpoint .* says 0 and \d+ bytes"
    with pytest.raises(ValueError, match=cut):
        restore(path)
    Path(checkpoint_path(path)).write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"events.jsonl.position' is unreadable"):
        restore(path)
    Path(checkpoint_path(path)).write_bytes(b'{"files":0,"size":0,"position":[[1,"AAAA",3]]}')
    with pytest.raises(ValueError, match="has a bad topic"):
        restore(path)


def _logger(address: str, log: Path, name: str) -> ServiceSpec:
    return ServiceSpec(
        name,
        [sys.executable, "-m", "wirebus.services.event_logger",
         "--address", address, "--out", str(log), "--max-bytes", "200000"],
    )  # fmt: skip


def _lines(log: Path) -> int:
    return sum(Path(f).read_bytes().count(b"\n") for f in log_files(log))


def _checkpointed(log: Path) -> int:
    """How many bytes of the log the logger's checkpoint covers (0 before it has one)."""
    try:
        return int(json.loads(Path(checkpoint_path(log)).read_bytes())["size"])
    except FileNotFoundError:
        return 0  # none yet (it is replaced in one rename, so never seen half written)


async def _wait_for_lines(log: Path, count: int, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while _lines(log) < count:
        assert loop.time() < deadline, f"{log} holds {_lines(log)} lines, not {count}"
        await asyncio.sleep(0.02)  # a file written by another process: nothing to wait on


async def test_a_logger_killed_mid_stream_and_restarted_logs_every_record_once(
    tmp_path: Path, wirebus_address: str
) -> None:
    log = tmp_path / "events.jsonl"
    async with EventPublisherService(wirebus_address, replay=50_000) as events:
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                for _ in range(20):
                    events.issued(f"s{events.published}", timestamp_ns=events.published)
                await asyncio.sleep(0.001)

        async with ServiceLauncher(ready_timeout=30, log_dir=tmp_path) as first:
            await first.start([_logger(wirebus_address, log, "logger")])
            await events.wait_for_subscribers(1, timeout=10)
            streaming = asyncio.create_task(stream())
            await _wait_for_lines(log, 2000)
            os.kill(first.pids["logger"], signal.SIGKILL)  # mid-stream, mid-write maybe
            assert await first.stop() == {"logger": -signal.SIGKILL}
        killed_at = events.published
        async with ServiceLauncher(ready_timeout=30, log_dir=tmp_path) as second:
            await second.start([_logger(wirebus_address, log, "restarted")])
            await _wait_for_lines(log, killed_at + 2000)
            stop.set()
            await streaming
            events.issued("last", timestamp_ns=events.published)
            await events.flush(timeout=10)
            assert await second.stop() == {"restarted": 0}  # it reads what is on its way first
        service_log = Path(second.log_path("restarted"))
    stderr = await asyncio.to_thread(service_log.read_text)
    records = logged(log)
    assert [r.timestamp_ns for r in records] == list(range(events.published)), stderr
    assert "0 missed" in stderr
    assert " 0 recovered" not in stderr  # what the killed logger had not stored came back


async def test_a_logger_restarted_after_the_last_event_still_gets_the_rest(
    tmp_path: Path, wirebus_address: str
) -> None:
    log = tmp_path / "events.jsonl"
    async with EventPublisherService(wirebus_address) as events:
        async with ServiceLauncher(ready_timeout=30, log_dir=tmp_path) as first:
            await first.start([_logger(wirebus_address, log, "logger")])
            await events.wait_for_subscribers(1, timeout=10)
            for i in range(3000):
                events.issued(f"s{i}", timestamp_ns=i)
            # killed once it has stored some of it: a logger killed before its first
            # checkpoint knows no publisher, and this publisher says nothing more
            await wait_until_async(lambda: _checkpointed(log) > 0, "the logger's checkpoint")
            os.kill(first.pids["logger"], signal.SIGKILL)
            assert await first.stop() == {"logger": -signal.SIGKILL}
        for i in range(3000, 4000):  # the last events, while no logger runs
            events.issued(f"s{i}", timestamp_ns=i)
        await events.flush(timeout=10)
        async with ServiceLauncher(ready_timeout=30, log_dir=tmp_path) as second:
            await second.start([_logger(wirebus_address, log, "restarted")])
            await _wait_for_lines(log, 4000)  # the publisher says nothing more meanwhile
            assert await second.stop() == {"restarted": 0}
    assert [r.timestamp_ns for r in logged(log)] == list(range(4000))


def _session(samples: int) -> list[EventRecord]:
    """A session of ``samples`` tracked samples: every event type, on all three topics."""
    records = [
        EventRecord(SessionEventType.STARTED, 0),
        EventRecord(SessionEventType.START_PERFORMANCE_TRACKING, 1),
    ]
    for i in range(samples):
        at = 10 + 10 * i
        records += [
            EventRecord(SampleEventType.ISSUED, at, f"s{i}"),
            EventRecord(SampleEventType.FIRST_CHUNK, at + 3, f"s{i}"),
            EventRecord(SampleEventType.COMPLETE, at + 9, f"s{i}", TextModelOutput(n_tokens=5)),
        ]
    end = 10 + 10 * samples
    return [
        *records,
        EventRecord(SessionEventType.STOP_PERFORMANCE_TRACKING, end),
        EventRecord(SessionEventType.ENDED, end + 1),
    ]


def _aggregator(address: str, store: Path, name: str) -> ServiceSpec:
    # its snapshot socket next to the store: a SIGKILLed process removes nothing it made
    return ServiceSpec(
        name,
        [sys.executable, "-m", "wirebus.services.metrics_aggregator",
         "--address", address, "--store", str(store),
         "--snapshot-address", f"ipc://{store}.snapshots"],
    )  # fmt: skip


async def test_an_aggregator_killed_and_restarted_on_a_fresh_store_rebuilds_the_same_metrics(
    tmp_path: Path, wirebus_address: str
) -> None:
    session = _session(300)
    with BasicKVStore(tmp_path / "reference") as reference:
        MetricsAggregator(reference).handle(session)
        with KVStoreReader(reference.path) as reader:
            expected = reader.snapshot()
    with ZmqMessagePublisher(EventRecordCodec(), wirebus_address, replay=10_000) as publisher:
        async with ServiceLauncher(ready_timeout=30) as first:
            await first.start([_aggregator(wirebus_address, tmp_path / "first", "first")])
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(session[:500])
            await publisher.flush(timeout=10)
            with KVStoreReader(tmp_path / "first") as reader:
                await wait_for_events(reader, 500)
            os.kill(first.pids["first"], signal.SIGKILL)
            assert await first.stop() == {"first": -signal.SIGKILL}
        await wait_until_async(lambda: publisher.subscriptions == 0, "the first one gone")
        publisher.publish_many(session[500:800])  # while no aggregator runs
        await publisher.flush(timeout=10)
        async with ServiceLauncher(ready_timeout=30) as second:
            await second.start([_aggregator(wirebus_address, tmp_path / "second", "second")])
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(session[800:])
            await publisher.flush(timeout=10)
            with KVStoreReader(tmp_path / "second") as reader:
                await wait_for_events(reader, len(session))
                rebuilt = reader.snapshot()
            assert await second.stop() == {"second": 0}
    assert rebuilt == expected
    assert rebuilt["perf_samples_completed"] == 300
