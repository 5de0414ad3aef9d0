"""Pub/sub over real ZMQ sockets and real processes (PITFALLS 1-10)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from _peers import build_frame, parse_frame
from _support import Tick, tick_codec
from wirebus import (
    TOPIC_FRAME_SIZE,
    ErrorData,
    ErrorEventType,
    EventRecord,
    EventRecordCodec,
    MsgspecCodec,
    SampleEventType,
    SessionEventType,
    make_topic,
)
from wirebus.record import SAMPLE_TOPIC, SESSION_TOPIC
from wirebus.testing import CollectingSubscriber
from wirebus.transport import (
    WIRE_VERSION,
    ZmqMessagePublisher,
    ZmqMessageSubscriber,
)

PEERS = str(Path(__file__).with_name("_peers.py"))


class Collector(CollectingSubscriber[Any]):
    """The plugin's collecting subscriber, for any item type."""


@pytest.fixture
def address(wirebus_address: str) -> str:
    return wirebus_address


@pytest.fixture
async def pair(address: str) -> AsyncIterator[tuple[ZmqMessagePublisher[Tick], Collector]]:
    publisher = ZmqMessagePublisher(tick_codec(), address)
    subscriber = Collector(tick_codec(), address)
    await subscriber.start()
    await publisher.wait_for_subscribers(1, timeout=10)
    yield publisher, subscriber
    publisher.close()
    await subscriber.aclose()


def _spawn_publisher(address: str, n: int, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, PEERS, "publish", address, str(n), mode])


@pytest.fixture
def reap() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


# -- delivery ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bind", "connect"])
async def test_cross_process_delivery_in_order_nothing_lost(
    address: str, mode: str, reap: list[subprocess.Popen[bytes]]
) -> None:
    n = 100_000
    connect = mode == "bind"  # the subscriber does the opposite of the publisher
    async with ZmqMessageSubscriber(EventRecordCodec(), address, connect=connect) as subscriber:
        reap.append(_spawn_publisher(address, n, mode))
        for expected in range(n):
            record = await subscriber.receive(timeout=20)
            assert record.timestamp_ns == expected
            assert record.sample_uuid == f"{expected:016x}"
        assert reap[0].wait(timeout=20) == 0
        assert subscriber.stats.received == n
        assert subscriber.stats.dropped == 0
        assert subscriber.stats.messages < n / 10, "items were not batched"


async def test_idle_item_goes_out_at_once(
    pair: tuple[ZmqMessagePublisher[Tick], Collector],
) -> None:
    publisher, subscriber = pair
    for seq in range(5):
        publisher.publish(Tick(seq))
        await subscriber.wait_until(lambda n=seq + 1: len(subscriber.items) == n, timeout=5)
    await publisher.flush()  # the writer counts a message just after sending it
    assert subscriber.items == [Tick(s) for s in range(5)]
    assert publisher.stats.messages == 5


@pytest.mark.parametrize("loop_too", [False, True], ids=["threads", "threads-and-loop"])
async def test_publish_from_plain_threads(address: str, loop_too: bool) -> None:
    """Threads without a loop, alone or while a loop publishes too (both send under one lock):
    nothing lost, each producer's items in its order."""
    publisher = ZmqMessagePublisher(tick_codec(), address)
    async with Collector(tick_codec(), address) as subscriber:
        await publisher.wait_for_subscribers(timeout=10)

        def produce(start: int) -> None:
            for seq in range(start, start + 10_000):
                publisher.publish(Tick(seq))

        blocks = (1, 2) if loop_too else (0, 1, 2)
        threads = [threading.Thread(target=produce, args=(k * 10_000,)) for k in blocks]
        for thread in threads:
            thread.start()
        if loop_too:
            for seq in range(10_000):
                publisher.publish(Tick(seq))
                if seq % 100 == 0:
                    await asyncio.sleep(0)
        for thread in threads:
            await asyncio.to_thread(thread.join)
        await subscriber.wait_until(lambda: len(subscriber.items) == 30_000)
        publisher.close()
    seqs = [tick.seq for tick in subscriber.items]
    assert sorted(seqs) == list(range(30_000))
    for k in range(3):  # each producer's items stay in its order
        own = [s for s in seqs if k * 10_000 <= s < (k + 1) * 10_000]
        assert own == sorted(own)
    assert subscriber.stats.dropped == 0


async def test_one_loop_turn_goes_out_in_at_most_two_messages(
    pair: tuple[ZmqMessagePublisher[Tick], Collector],
) -> None:
    """An idle publisher sends the first item at once and the rest of the turn together."""
    publisher, subscriber = pair
    for seq in range(50):
        publisher.publish(Tick(seq))
    await publisher.flush()
    assert publisher.stats.messages == 2
    await subscriber.wait_until(lambda: len(subscriber.items) == 50, timeout=5)
    assert subscriber.items == [Tick(s) for s in range(50)]


@pytest.mark.parametrize("pause", [0.0, 0.2])
async def test_a_blocked_event_loop_delays_delivery_but_never_stops_it(
    address: str, pause: float
) -> None:
    """Items left for the loop's next turn go out from the writer thread if it never comes,
    also when the loop blocked, after its first item, long enough for the writer to go idle."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as raw:
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(address)
        with ZmqMessagePublisher(tick_codec(), address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            publisher.publish(Tick(0))  # sent at once; the writer starts ticking
            time.sleep(pause)  # noqa: ASYNC251 - the loop blocks; the writer goes idle meanwhile
            for seq in (1, 2):
                publisher.publish(Tick(seq))
            seqs: list[int] = []
            deadline = time.monotonic() + 5
            while len(seqs) < 3 and raw.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                _, _, first, payloads = parse_frame(raw.recv())  # the loop is blocked here
                seqs.extend(range(first, first + len(payloads)))
            assert seqs == [0, 1, 2]


def test_sync_publisher_close_delivers_pending(address: str) -> None:
    """No event loop anywhere: a sync SUB socket reads what a sync caller published."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as raw:
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(address)
        publisher = ZmqMessagePublisher(tick_codec(), address)
        asyncio.run(publisher.wait_for_subscribers(timeout=10))
        for seq in range(1000):
            publisher.publish(Tick(seq))
        publisher.close()
        assert publisher.stats.sent == 1000
        assert publisher.stats.pending == 0
        total = 0
        while total < 1000:
            assert raw.poll(5000), f"only {total} of 1000 items arrived"
            frame = raw.recv()
            total += int.from_bytes(frame[TOPIC_FRAME_SIZE + 4 : TOPIC_FRAME_SIZE + 8], "little")
        assert total == 1000


async def test_close_delivers_pending_to_another_process(
    address: str, reap: list[subprocess.Popen[bytes]]
) -> None:
    """The child publishes and closes at once; everything still arrives (close flushes)."""
    n = 20_000
    async with Collector(EventRecordCodec(), address, connect=False) as subscriber:
        reap.append(_spawn_publisher(address, n, "connect"))
        assert await asyncio.to_thread(reap[0].wait, 20) == 0
        await subscriber.wait_until(lambda: len(subscriber.items) == n)
    assert [r.timestamp_ns for r in subscriber.items] == list(range(n))


async def test_flush_hands_everything_to_zmq(
    pair: tuple[ZmqMessagePublisher[Tick], Collector],
) -> None:
    publisher, _ = pair
    for seq in range(10_000):
        publisher.publish(Tick(seq))
    await publisher.flush(timeout=10)
    assert publisher.stats.sent == 10_000
    assert publisher.stats.pending == 0


# -- topics --------------------------------------------------------------------------------


async def test_topic_filtering_by_event_category(address: str) -> None:
    codec = EventRecordCodec()
    publisher = ZmqMessagePublisher(codec, address)
    sessions = Collector(codec, address, topics=[SESSION_TOPIC])
    samples = Collector(codec, address, topics=["sample"])
    everything = Collector(codec, address)
    for subscriber in (sessions, samples, everything):
        await subscriber.start()
    try:
        await publisher.wait_for_subscribers(3, timeout=10)
        records = [
            EventRecord(SessionEventType.STARTED, timestamp_ns=0),
            EventRecord(SampleEventType.ISSUED, timestamp_ns=1),
            EventRecord(SampleEventType.COMPLETE, timestamp_ns=2),
            EventRecord(ErrorEventType.SAMPLE_FAILED, timestamp_ns=3),
            EventRecord(SessionEventType.ENDED, timestamp_ns=4),
        ]
        for record in records:
            publisher.publish(record)
        await everything.wait_until(lambda: len(everything.items) == 5)
        await sessions.wait_until(lambda: len(sessions.items) == 2)
        await samples.wait_until(lambda: len(samples.items) == 2)
        assert everything.items == records
        assert [r.timestamp_ns for r in sessions.items] == [0, 4]
        assert [r.timestamp_ns for r in samples.items] == [1, 2]
        # per-topic sequence numbers: a filtered subscriber sees no gaps
        assert sessions.stats.dropped == samples.stats.dropped == 0
    finally:
        publisher.close()
        for subscriber in (sessions, samples, everything):
            await subscriber.aclose()


# -- errors never stall the reader (PITFALLS 1, 9) ------------------------------------------


class _Passthrough(MsgspecCodec[bytes]):
    """Publishes raw payloads as they are, to put arbitrary bytes on the wire."""

    def encode(self, item: bytes) -> tuple[bytes, bytes]:
        return SAMPLE_TOPIC, item


async def test_undecodable_event_record_becomes_generic_error(address: str) -> None:
    publisher = ZmqMessagePublisher(_Passthrough(bytes, topic=SAMPLE_TOPIC), address)
    good = EventRecordCodec().encode(EventRecord(SampleEventType.ISSUED, timestamp_ns=7))[1]
    async with Collector(EventRecordCodec(), address) as subscriber:
        await publisher.wait_for_subscribers(timeout=10)
        for payload in (b"\xc1garbage", msgspec.msgpack.encode({"event_type": "nope"}), good):
            publisher.publish(payload)
        await subscriber.wait_until(lambda: len(subscriber.items) == 3)
        publisher.close()
    first, second, third = subscriber.items
    assert first.event_type is ErrorEventType.GENERIC
    assert isinstance(first.data, ErrorData)
    assert first.data.error_type == "DecodeError"
    assert second.event_type is ErrorEventType.GENERIC
    assert isinstance(second.data, ErrorData)
    assert second.data.error_type == "ValidationError"
    assert third.timestamp_ns == 7
    assert subscriber.stats.decode_errors == 2
    assert subscriber.errors == []


class _Flaky:
    """A codec whose decode raises KeyError for odd numbers (not a decode error)."""

    def __init__(self) -> None:
        self.inner = tick_codec()

    def encode(self, item: Tick) -> tuple[bytes, bytes]:
        return self.inner.encode(item)

    def decode(self, payload: bytes | memoryview) -> Tick:
        tick = self.inner.decode(payload)
        if tick.seq % 2:
            raise KeyError(tick.seq)
        return tick

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> Tick | None:
        raise exc


@pytest.mark.parametrize("burst", [1, 5_000])
async def test_on_decode_error_raising_never_stalls_the_reader(address: str, burst: int) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address)
    async with Collector(_Flaky(), address) as subscriber:
        await publisher.wait_for_subscribers(timeout=10)
        for round_ in range(3):  # several separate edges of the FD
            for seq in range(burst * 2):
                publisher.publish(Tick(seq))
            want = (round_ + 1) * burst  # the good and the bad may come in separate messages
            await subscriber.wait_until(
                lambda w=want: len(subscriber.items) == w and len(subscriber.errors) == w  # type: ignore[misc]
            )
        publisher.close()
    assert all(tick.seq % 2 == 0 for tick in subscriber.items)
    assert subscriber.stats.decode_errors == 3 * burst
    assert len(subscriber.errors) == 3 * burst
    exc, payload = subscriber.errors[0]
    assert isinstance(exc, KeyError)
    assert payload is not None
    assert tick_codec().decode(payload).seq == 1


async def test_process_raising_is_reported_and_reading_goes_on(address: str) -> None:
    class Failing(Collector):
        async def process(self, items: list[Any]) -> None:
            if any(tick.seq == 3 for tick in items):
                raise RuntimeError("process failed on 3")
            await super().process(items)

    async with (
        Failing(tick_codec(), address) as subscriber,
        ZmqMessagePublisher(tick_codec(), address) as publisher,
    ):
        await publisher.wait_for_subscribers(timeout=10)
        for seq in range(10):
            publisher.publish(Tick(seq))
            # one item per batch: the next is sent only once this one has been decoded
            await subscriber.wait_until(lambda n=seq + 1: subscriber.stats.received == n)  # type: ignore[misc]
        await subscriber.wait_until(lambda: 9 in [t.seq for t in subscriber.items])
    assert subscriber.stats.process_errors == 1
    assert any(isinstance(e, RuntimeError) and "3" in str(e) for e, _ in subscriber.errors)
    assert [t.seq for t in subscriber.items] == [0, 1, 2, 4, 5, 6, 7, 8, 9]


async def test_default_on_error_logs_with_traceback(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address)
    async with ZmqMessageSubscriber(_Flaky(), address) as subscriber:
        await publisher.wait_for_subscribers(timeout=10)
        publisher.publish(Tick(1))
        publisher.publish(Tick(2))
        assert await subscriber.receive(timeout=10) == Tick(2)
        publisher.close()
    assert any(r.exc_info and r.exc_info[0] is KeyError for r in caplog.records)


async def test_garbage_frames_are_counted_and_skipped(address: str) -> None:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.XPUB) as raw:
        raw.bind(address)
        async with Collector(tick_codec(), address) as subscriber:
            await asyncio.to_thread(raw.recv)  # the subscription arrived
            garbage = [
                b"",
                b"short",
                make_topic("tick") + b"\x09" * 30,  # wrong version
                make_topic("tick") + bytes([WIRE_VERSION]) + b"\0" * 23 + b"\xff" * 8,
                os.urandom(1000),
            ]
            for frame in garbage:
                raw.send(frame)
            raw.send(build_frame(make_topic("tick"), 1, 0, [tick_codec().encode(Tick(42))[1]]))
            await subscriber.wait_until(lambda: len(subscriber.items) == 1)
    assert subscriber.items == [Tick(42)]
    assert subscriber.stats.malformed == len(garbage)
    assert len(subscriber.errors) == len(garbage)


# -- gaps are visible (PITFALLS 3, 6) --------------------------------------------------------


async def test_gaps_from_hwm_drops_are_counted(address: str) -> None:
    n = 50_000
    publisher = ZmqMessagePublisher(tick_codec(), address, sndhwm=10)
    subscriber = Collector(tick_codec(), address, rcvhwm=10)
    await subscriber.start()
    try:
        await publisher.wait_for_subscribers(timeout=10)
        subscriber._pause_reading()  # a subscriber too slow to read: queues fill, PUB drops
        for seq in range(n):
            publisher.publish(Tick(seq))
        await publisher.flush(timeout=10)
        subscriber._resume_reading()
        seq = n
        while not subscriber.items or subscriber.items[-1].seq < n:
            publisher.publish(Tick(seq))  # may itself be dropped while the queues still drain
            seq += 1
            with contextlib.suppress(TimeoutError):
                await subscriber.wait_until(
                    lambda: bool(subscriber.items) and subscriber.items[-1].seq >= n, timeout=0.05
                )
    finally:
        await subscriber.aclose()  # first: a publisher with linger -1 waits for a live peer
        publisher.close()
    stats = subscriber.stats
    assert stats.dropped > 0, "HWM drops went unnoticed"
    assert stats.received + stats.dropped == subscriber.items[-1].seq + 1
    assert [t.seq for t in subscriber.items] == sorted(t.seq for t in subscriber.items)


async def test_conflate_keeps_only_the_newest(address: str) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address, conflate=True)
    subscriber = Collector(tick_codec(), address, conflate=True)
    await subscriber.start()
    try:
        await publisher.wait_for_subscribers(timeout=10)
        subscriber._pause_reading()
        for seq in range(1000):
            publisher.publish(Tick(seq))
        await publisher.flush(timeout=10)
        await asyncio.to_thread(zmq.select, [subscriber._socket], [], [], 5)
        subscriber._resume_reading()
        await subscriber.wait_until(
            lambda: bool(subscriber.items) and subscriber.items[-1].seq == 999
        )
    finally:
        await subscriber.aclose()
        publisher.close()
    assert len(subscriber.items) < 1000
    assert subscriber.stats.received + subscriber.stats.dropped == 1000


# -- slow joiner, immediate, close (PITFALLS 2, 5, 7) --------------------------------------


async def test_wait_for_subscribers_times_out_naming_the_count(address: str) -> None:
    with (
        ZmqMessagePublisher(tick_codec(), address) as publisher,
        pytest.raises(TimeoutError, match="0 of 2 subscriptions"),
    ):
        await publisher.wait_for_subscribers(2, timeout=0.2)


async def test_close_fails_a_pending_wait_for_subscribers(address: str) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address)
    waiting = asyncio.create_task(publisher.wait_for_subscribers(5))
    await publisher.flush()  # the waiter is registered: its marker went before this one
    publisher.close()
    with pytest.raises(RuntimeError, match="closed with 0 of 5 subscriptions"):
        await asyncio.wait_for(waiting, 5)


async def test_a_subscriber_joining_while_a_loop_publishes_is_seen(
    pair: tuple[ZmqMessagePublisher[Tick], Collector], address: str
) -> None:
    """The loop's sends take the socket's FD edge but do not read subscriptions.

    The senders read them every 64 messages, and the writer thread on its 20 ms tick.
    """
    publisher, _ = pair
    busy, stop = asyncio.Event(), asyncio.Event()

    async def publish_hard() -> None:
        seq = 0
        while not stop.is_set():
            for _ in range(50):
                publisher.publish(Tick(seq))
                seq += 1
            if publisher.stats.messages >= 200:  # the loop's sends have had the socket a while
                busy.set()
            await asyncio.sleep(0)

    task = asyncio.create_task(publish_hard())
    try:
        await asyncio.wait_for(busy.wait(), timeout=10)
        async with Collector(tick_codec(), address) as late:
            await publisher.wait_for_subscribers(2, timeout=5)
            await late.wait_until(lambda: len(late.items) > 0, timeout=5)
    finally:
        stop.set()
        await task


def _wakeups(thread: threading.Thread) -> int:
    """How many times ``thread`` has slept and been woken: its voluntary context switches."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


async def test_the_writer_stops_ticking_once_idle(
    pair: tuple[ZmqMessagePublisher[Tick], Collector],
) -> None:
    publisher, subscriber = pair
    for seq in range(300):  # sent by the loop: the writer starts its 20 ms tick
        publisher.publish(Tick(seq))
    await subscriber.wait_until(lambda: len(subscriber.items) == 300)
    deadline = time.monotonic() + 5
    while True:
        before = _wakeups(publisher._writer.thread)
        await asyncio.sleep(0.1)  # a window of five ticks, polled until one is quiet
        if _wakeups(publisher._writer.thread) == before:
            break
        assert time.monotonic() < deadline, "an idle publisher's writer still wakes every tick"


async def test_a_loop_that_sends_every_item_at_once_never_wakes_the_writer(
    pair: tuple[ZmqMessagePublisher[Tick], Collector],
) -> None:
    """A paced publisher's items each go out at once, so nothing ever waits for the writer:
    it must not tick, or it would compete for the GIL with a publishing thread that
    busy-waits (and every forced switch delays that thread's sends)."""
    publisher, subscriber = pair
    before = _wakeups(publisher._writer.thread)
    for seq in range(50):
        publisher.publish(Tick(seq))
        await subscriber.wait_until(lambda n=seq + 1: len(subscriber.items) == n)
    assert publisher.stats.messages == 50  # each alone, at once
    assert _wakeups(publisher._writer.thread) == before


async def test_fan_in_publishers_connect_to_a_bound_subscriber(address: str) -> None:
    async with Collector(tick_codec(), address, connect=False) as subscriber:
        publishers = [ZmqMessagePublisher(tick_codec(), address, bind=False) for _ in range(3)]
        try:
            for publisher in publishers:
                await publisher.wait_for_subscribers(timeout=10)
            for k, publisher in enumerate(publishers):
                for seq in range(1000):
                    publisher.publish(Tick(k * 1000 + seq))
        finally:
            for publisher in publishers:
                publisher.close()
        await subscriber.wait_until(lambda: len(subscriber.items) == 3000)
    seqs = [t.seq for t in subscriber.items]
    for k in range(3):
        assert [s for s in seqs if k * 1000 <= s < (k + 1) * 1000] == list(
            range(k * 1000, (k + 1) * 1000)
        )
    assert subscriber.stats.dropped == 0


def test_close_with_timeout_returns_when_the_peer_never_comes(address: str) -> None:
    """linger=-1 and a queue for a peer that never connects would hang ctx.term() forever."""
    publisher = ZmqMessagePublisher(tick_codec(), address, bind=False, immediate=False)
    for seq in range(100):
        publisher.publish(Tick(seq))
    started = time.monotonic()
    publisher.close(timeout=0.3)
    assert time.monotonic() - started < 5


def test_immediate_close_does_not_wait_for_absent_peers(address: str) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address, bind=False)  # linger -1
    for seq in range(100):
        publisher.publish(Tick(seq))
    started = time.monotonic()
    publisher.close()  # immediate=True queued nothing for the absent peer
    assert time.monotonic() - started < 5


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["udp://127.0.0.1:5000", "http://x", "127.0.0.1:5000", "tcp://", "pgm://eth0;x:1"]
)
def test_unsupported_address_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unsupported address|needs a host and a port"):
        ZmqMessagePublisher(tick_codec(), bad)
    with pytest.raises(ValueError, match=r"unsupported address|needs a host and a port"):
        ZmqMessageSubscriber(tick_codec(), bad)


@pytest.mark.parametrize("bad", ["tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://[::]:5555"])
def test_all_interfaces_only_when_asked(bad: str) -> None:
    with pytest.raises(ValueError, match="every interface"):
        ZmqMessagePublisher(tick_codec(), bad)
    with pytest.raises(ValueError, match="every interface"):
        ZmqMessageSubscriber(tick_codec(), bad, connect=False)


def test_tcp_wildcard_port_reports_the_bound_endpoint() -> None:
    with ZmqMessagePublisher(tick_codec(), "tcp://127.0.0.1:*") as publisher:
        host, port = publisher.address.removeprefix("tcp://").rsplit(":", 1)
        assert host == "127.0.0.1"
        assert int(port) > 0


def test_address_in_use_is_an_os_error(address: str) -> None:
    with ZmqMessagePublisher(tick_codec(), address) as first:
        with pytest.raises(OSError, match="address in use") as info:
            ZmqMessagePublisher(tick_codec(), address)
        assert info.value.errno == errno.EADDRINUSE
        assert address in str(info.value)
        with pytest.raises(OSError, match="address in use"):
            ZmqMessageSubscriber(tick_codec(), address, connect=False)
        tcp = first.address if first.address.startswith("tcp") else None
        assert tcp is None
    with (
        ZmqMessagePublisher(tick_codec(), "tcp://127.0.0.1:*") as first_tcp,
        pytest.raises(OSError, match="address in use"),
    ):
        ZmqMessagePublisher(tick_codec(), first_tcp.address)


def test_stale_ipc_file_is_not_in_use(address: str) -> None:
    path = address.removeprefix("ipc://")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: binding over it is fine
    with ZmqMessagePublisher(tick_codec(), address) as publisher:
        assert publisher.address == address


@pytest.mark.parametrize("topic", ["", b"", "x" * (TOPIC_FRAME_SIZE + 1)])
def test_malformed_topic_names_are_value_errors(address: str, topic: str | bytes) -> None:
    if topic in ("", b""):
        with pytest.raises(ValueError, match="empty"):
            MsgspecCodec(Tick, topic=topic)
    else:
        with pytest.raises(ValueError, match="longer than TOPIC_FRAME_SIZE"):
            ZmqMessageSubscriber(tick_codec(), address, topics=[topic])


def test_topics_must_be_an_iterable_of_names(address: str) -> None:
    with pytest.raises(TypeError, match="'sample'"):
        ZmqMessageSubscriber(tick_codec(), address, topics="sample")
    with pytest.raises(ValueError, match="at least one topic"):
        ZmqMessageSubscriber(tick_codec(), address, topics=[])


def test_wrong_topic_width_is_rejected_at_publish(address: str) -> None:
    codec = MsgspecCodec(Tick, topic=lambda tick: b"short")
    with ZmqMessagePublisher(codec, address) as publisher:
        with pytest.raises(ValueError, match=r"b'short' of 5 bytes"):
            publisher.publish(Tick(1))
        assert publisher.stats.published == 0


class _Tagged:
    """Encodes ``(name, payload)`` as is: a str payload breaks the contract."""

    def encode(self, item: tuple[str, Any]) -> tuple[bytes, bytes]:
        return make_topic(item[0]), item[1]

    def decode(self, payload: bytes | memoryview) -> str:
        return bytes(payload).decode()

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> str | None:
        raise exc


def test_an_encode_result_that_is_not_a_pair_is_refused_at_publish(address: str) -> None:
    class OneTuple(_Tagged):
        def encode(self, item: tuple[str, Any]) -> tuple[bytes, bytes]:
            return (make_topic(item[0]),)  # type: ignore[return-value]

    with ZmqMessagePublisher(OneTuple(), address) as publisher:
        for _ in range(2):  # refused each time, not failed: nothing was queued
            with pytest.raises(ValueError, match=r"as \(b'a\\x00.*\), not a \(topic, payload"):
                publisher.publish(("a", b"x"))
        assert publisher.stats.published == 0


def test_a_payload_that_is_not_bytes_is_refused_at_publish(address: str) -> None:
    """A str payload (or topic) is refused where it was made, not at send time far away."""
    with ZmqMessagePublisher(_Tagged(), address) as publisher:
        with pytest.raises(TypeError, match=r"payload of type str; payloads must be bytes"):
            publisher.publish(("a", "not bytes"))
        publisher.publish(("a", b"fine"))
        assert publisher.stats.published == 1


def test_non_codec_is_a_type_error(address: str) -> None:
    with pytest.raises(TypeError, match="is not a MessageCodec"):
        ZmqMessagePublisher(object(), address)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is not a MessageCodec"):
        ZmqMessageSubscriber("codec", address)  # type: ignore[arg-type]


async def test_use_after_close_is_a_runtime_error(address: str) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address)
    publisher.close()
    publisher.close()  # idempotent
    with pytest.raises(RuntimeError, match=f"publish\\(\\) on closed .*{address}"):
        publisher.publish(Tick(1))
    with pytest.raises(RuntimeError, match="closed"):
        await publisher.flush()
    subscriber = ZmqMessageSubscriber(tick_codec(), address)
    await subscriber.aclose()
    await subscriber.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await subscriber.start()
    with pytest.raises(RuntimeError, match="closed"):
        await subscriber.receive(timeout=1)


async def test_receive_times_out(address: str) -> None:
    async with ZmqMessageSubscriber(tick_codec(), address) as subscriber:
        with pytest.raises(TimeoutError, match=r"nothing arrived within 0\.05"):
            await subscriber.receive(timeout=0.05)


async def test_async_iteration_ends_at_close(
    pair: tuple[ZmqMessagePublisher[Tick], Collector], address: str
) -> None:
    publisher, _ = pair
    async with ZmqMessageSubscriber(tick_codec(), address) as subscriber:
        await publisher.wait_for_subscribers(2, timeout=10)
        for seq in range(3):
            publisher.publish(Tick(seq))
        seen = []
        async for tick in subscriber:
            seen.append(tick.seq)
            if len(seen) == 3:
                subscriber.close()
    assert seen == [0, 1, 2]


# -- nothing leaks (PITFALL 5) -------------------------------------------------------------


async def test_fifty_open_close_cycles_leave_no_fd(address: str) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        async with (
            Collector(tick_codec(), address) as subscriber,
            ZmqMessagePublisher(tick_codec(), address) as publisher,
        ):
            await publisher.wait_for_subscribers(timeout=10)
            publisher.publish(Tick(1))
            await subscriber.wait_until(lambda s=subscriber: len(s.items) == 1)  # type: ignore[misc]
    deadline = time.monotonic() + 2  # libzmq's reaper closes fds just after close()
    while len(os.listdir("/proc/self/fd")) != before and time.monotonic() < deadline:  # noqa: ASYNC110 - an OS count, nothing to await
        await asyncio.sleep(0.01)
    assert len(os.listdir("/proc/self/fd")) == before
    writers = [t for t in threading.enumerate() if t.name.startswith("wirebus-publisher")]
    assert writers == []


class _Sizing(Collector):
    """Notes the size of every batch process() gets."""

    def __init__(self, address: str) -> None:
        super().__init__(tick_codec(), address)
        self.sizes: list[int] = []

    async def process(self, items: list[Any]) -> None:
        self.sizes.append(len(items))
        await super().process(items)


async def test_a_backlog_reaches_process_in_bounded_batches(address: str) -> None:
    """Messages that piled up are decoded a few at a time, not all into one huge batch."""
    async with _Sizing(address) as subscriber:
        with ZmqMessagePublisher(tick_codec(), address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            for seq in range(10_000):  # ~80 full messages before the subscriber reads any
                publisher.publish(Tick(seq))
        await subscriber.wait_until(lambda: len(subscriber.items) == 10_000)
    assert subscriber.items == [Tick(s) for s in range(10_000)]
    assert max(subscriber.sizes) < 256 + 128, subscriber.sizes


async def test_a_backlog_of_bad_payloads_yields_to_the_loop_between_batches(address: str) -> None:
    """Payloads that fail to decode count towards a batch too: a flood of them cannot hold
    the event loop for the whole buffer."""
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    class Noting(Collector):
        turns_seen: list[int] = []

        async def on_error(self, exc: BaseException, payload: bytes | None) -> None:
            self.turns_seen.append(turns)
            await super().on_error(exc, payload)

    counter = asyncio.create_task(count_turns())
    try:
        async with Noting(tick_codec(), address) as subscriber:
            codec = _Passthrough(bytes, topic=SAMPLE_TOPIC)
            with ZmqMessagePublisher(codec, address) as publisher:
                await publisher.wait_for_subscribers(timeout=10)
                for _ in range(5_000):  # ~40 full messages before the subscriber reads any
                    publisher.publish(b"\xc1")  # never valid msgpack
            await subscriber.wait_until(lambda: len(subscriber.errors) == 5_000)
    finally:
        counter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counter
    # Two batches in consecutive turns can share a count when the tasks' order flips.
    per_count = collections.Counter(subscriber.turns_seen).values()
    assert max(per_count) < 2 * (256 + 128), sorted(per_count)


class _Gated(Collector):
    """A subscriber whose process() waits for a gate before it takes each batch."""

    def __init__(self, address: str) -> None:
        super().__init__(tick_codec(), address)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()
        self.cancelled = False

    async def process(self, items: list[Any]) -> None:
        self.waiting.set()
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        await super().process(items)


async def test_a_process_that_awaits_keeps_the_order(address: str) -> None:
    """The consumer starts in the reader callback and carries on in a task when it waits."""
    async with _Gated(address) as subscriber:
        with ZmqMessagePublisher(tick_codec(), address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            for seq in range(1_000):
                publisher.publish(Tick(seq))
                if seq % 7 == 0:
                    await asyncio.sleep(0)
            await asyncio.wait_for(subscriber.waiting.wait(), 5)
            for seq in range(1_000, 2_000):  # arrive while process() waits
                publisher.publish(Tick(seq))
            await publisher.flush()
            subscriber.gate.set()
            await subscriber.wait_until(lambda: len(subscriber.items) == 2_000, timeout=10)
    assert subscriber.items == [Tick(s) for s in range(2_000)]


async def test_close_cancels_a_waiting_process(address: str) -> None:
    subscriber = _Gated(address)
    await subscriber.start()
    with ZmqMessagePublisher(tick_codec(), address) as publisher:
        await publisher.wait_for_subscribers(timeout=10)
        publisher.publish(Tick(0))
        await asyncio.wait_for(subscriber.waiting.wait(), 5)
    await asyncio.wait_for(subscriber.aclose(), 5)
    assert subscriber.cancelled
    assert subscriber.items == []


# -- the wire format, from raw pyzmq (docs/wire-format.md) ---------------------------------


async def test_raw_pyzmq_sub_reads_what_wirebus_publishes(address: str) -> None:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as raw:
        raw.setsockopt(zmq.SUBSCRIBE, SAMPLE_TOPIC)
        raw.connect(address)
        with ZmqMessagePublisher(EventRecordCodec(), address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            for i in range(300):
                publisher.publish(EventRecord(SampleEventType.CHUNK, timestamp_ns=i))
            publisher.publish(EventRecord(SessionEventType.ENDED))  # filtered out
        records, seqs = [], []
        decoder = msgspec.msgpack.Decoder()
        while len(records) < 300:
            assert await asyncio.to_thread(raw.poll, 5000)
            topic, publisher_id, first_seq, payloads = parse_frame(raw.recv())
            assert topic == b"sample".ljust(TOPIC_FRAME_SIZE, b"\0")
            assert publisher_id == publisher.publisher_id
            seqs.extend(range(first_seq, first_seq + len(payloads)))
            records.extend(decoder.decode(p) for p in payloads)
    assert seqs == list(range(300))
    assert [r["timestamp_ns"] for r in records] == list(range(300))
    assert {r["event_type"] for r in records} == {"sample.chunk"}


async def test_wirebus_subscriber_reads_a_raw_pyzmq_publisher(address: str) -> None:
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.XPUB) as raw:
        raw.bind(address)
        async with Collector(EventRecordCodec(), address) as subscriber:
            await asyncio.to_thread(raw.recv)  # the subscription arrived
            encode = msgspec.msgpack.encode
            first = [encode({"event_type": "sample.issued", "timestamp_ns": i}) for i in range(3)]
            raw.send(build_frame(SAMPLE_TOPIC, 99, 0, first))
            # seq 3 and 4 never sent: the subscriber must count them as dropped
            raw.send(build_frame(SAMPLE_TOPIC, 99, 5, [encode({"event_type": "sample.complete"})]))
            await subscriber.wait_until(lambda: len(subscriber.items) == 4)
    assert [r.timestamp_ns for r in subscriber.items[:3]] == [0, 1, 2]
    assert subscriber.items[3].event_type is SampleEventType.COMPLETE
    assert subscriber.stats.dropped == 2
    assert subscriber.stats.received == 4


# -- regressions found in review ------------------------------------------------------------


async def test_conflating_receive_returns_the_newest(address: str) -> None:
    publisher = ZmqMessagePublisher(tick_codec(), address, conflate=True)
    try:
        async with ZmqMessageSubscriber(tick_codec(), address, conflate=True) as subscriber:
            await publisher.wait_for_subscribers(timeout=10)
            for seq in range(1000):
                publisher.publish(Tick(seq))
                if seq % 100 == 0:
                    await publisher.flush(timeout=10)  # several messages, not one
            await publisher.flush(timeout=10)
            deadline = time.monotonic() + 10
            while subscriber.stats.received + subscriber.stats.dropped < 1000:
                assert time.monotonic() < deadline, subscriber.stats
                await asyncio.sleep(0.01)  # polling a counter, with a deadline
            assert await subscriber.receive(timeout=1) == Tick(999)
            with pytest.raises(TimeoutError):
                await subscriber.receive(timeout=0.05)
            assert subscriber.stats.dropped > 0
    finally:
        publisher.close()
    assert publisher.stats.conflated > 0


async def test_close_before_the_first_read_logs_nothing(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with ZmqMessageSubscriber(tick_codec(), address):
        pass
    await asyncio.sleep(0)  # let a callback scheduled by start() run, if any was left
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_wait_for_subscribers_reports_the_count_at_timeout(address: str) -> None:
    with ZmqMessagePublisher(tick_codec(), address) as publisher:
        async with ZmqMessageSubscriber(tick_codec(), address):
            await publisher.wait_for_subscribers(1, timeout=10)
            with pytest.raises(TimeoutError, match="1 of 2 subscriptions"):
                await publisher.wait_for_subscribers(2, timeout=0.1)


@pytest.mark.parametrize("spelling", ["tcp://0:*", "tcp://0.0.0.0:*", "tcp://*:*"])
def test_every_interface_however_spelled_is_refused(spelling: str) -> None:
    with pytest.raises(ValueError, match="every interface"):
        ZmqMessagePublisher(tick_codec(), spelling)
    with ZmqMessagePublisher(tick_codec(), "tcp://0.0.0.0:*", allow_any_interface=True) as pub:
        assert pub.address.startswith("tcp://0.0.0.0:")


async def test_max_batch_bytes_bounds_every_message(address: str) -> None:
    ctx = zmq.Context.instance()
    payload_codec = _Passthrough(bytes, topic=SAMPLE_TOPIC)
    with ctx.socket(zmq.SUB) as raw:
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(address)
        with ZmqMessagePublisher(payload_codec, address, max_batch_bytes=4096) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            for _ in range(100):
                publisher.publish(b"x" * 1000)
        total = 0
        while total < 100:
            assert await asyncio.to_thread(raw.poll, 5000)
            _, _, _, payloads = parse_frame(raw.recv())
            assert sum(map(len, payloads)) <= 4096
            total += len(payloads)


def test_a_timed_out_wait_does_not_break_the_publisher(address: str) -> None:
    with ZmqMessagePublisher(tick_codec(), address) as publisher:
        with pytest.raises(TimeoutError):
            asyncio.run(publisher.wait_for_subscribers(1, timeout=0.05))  # its loop is then gone

        async def later() -> None:
            async with Collector(tick_codec(), address) as subscriber:
                await publisher.wait_for_subscribers(1, timeout=10)
                publisher.publish(Tick(1))
                await subscriber.wait_until(lambda: subscriber.items == [Tick(1)])

        asyncio.run(later())


async def test_empty_payloads_never_take_the_one_call_decode(address: str) -> None:
    publisher = ZmqMessagePublisher(_Passthrough(bytes, topic=SAMPLE_TOPIC), address)
    codec = MsgspecCodec(int, topic=SAMPLE_TOPIC)
    async with Collector(codec, address) as subscriber:
        await publisher.wait_for_subscribers(timeout=10)
        publisher.publish(b"\x01\x02")  # two msgpack values in one payload, then none
        publisher.publish(b"")
        publisher.close()
        await subscriber.wait_until(lambda: len(subscriber.errors) == 2)
    assert subscriber.items == []
    assert subscriber.stats.decode_errors == 2
