"""The event logger killed and started again (issue 12): its checkpoint, cut back with
``restore()``, and a real logger process SIGKILLed mid-stream that still logs every record once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from wirebus import EventRecord, SampleEventType, ServiceLauncher, ServiceSpec, make_topic
from wirebus.record import EventRecordCodec
from wirebus.services.event_logger import (
    JsonLinesWriter,
    checkpoint_path,
    log_files,
    restore,
)
from wirebus.services.event_publisher import EventPublisherService
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
    assert restore(path) == {}
    assert logged(path) == issued(0, 10)


def test_restore_cuts_the_log_back_to_its_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    position: Position = {(7, TOPIC): 10, (2**64 - 1, make_topic("other")): 3}
    writer = JsonLinesWriter(path)
    writer.write(issued(0, 10))
    writer.checkpoint(position)
    writer.write(issued(10, 15))  # after the checkpoint: due again after a restart
    writer.close()
    assert restore(path) == position
    assert logged(path) == issued(0, 10)
    assert restore(path) == position  # twice is the same
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
    assert restore(path) == {(1, TOPIC): 20}
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
            await asyncio.sleep(0)  # the restarted logger hears the stream going on
            await _wait_for_lines(log, killed_at + 2000)
            stop.set()
            await streaming
            events.issued("last", timestamp_ns=events.published)
            await events.flush(timeout=10)
            await _wait_for_lines(log, events.published)
            assert await second.stop() == {"restarted": 0}
        service_log = Path(second.log_path("restarted"))
    stderr = await asyncio.to_thread(service_log.read_text)
    records = logged(log)
    assert [r.timestamp_ns for r in records] == list(range(events.published)), stderr
    assert "0 missed" in stderr
    assert " 0 recovered" not in stderr  # what the killed logger had not stored came back
