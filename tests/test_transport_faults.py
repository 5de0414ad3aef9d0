"""Transport v2's fault probes, each with real sockets: what one bad item, one bad codec, one
oversized message or one forged frame used to break, and code without an event loop."""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec
import pytest
import zmq

from _peers import build_frame, parse_frame
from wirebus import MsgspecCodec, ZmqMessagePublisher, ZmqMessageSubscriber, make_topic
from wirebus.testing import CollectingSubscriber
from wirebus.transport import _decoder
from wirebus.transport._base import RateLimitedLog


class Tick(msgspec.Struct):
    seq: Any


class Quote(msgspec.Struct, tag="quote"):
    bid: float


class Trade(msgspec.Struct, tag="trade"):
    price: float


def tick_codec() -> MsgspecCodec[Tick]:
    return MsgspecCodec(Tick, topic="tick")


class Collector(CollectingSubscriber[Any]):
    """The plugin's collecting subscriber, for any item type."""


class Unprintable(MsgspecCodec[Tick]):
    """A codec whose repr raises, as MsgspecCodec's own did for a union type."""

    def __repr__(self) -> str:
        raise AttributeError("no repr for you")


class Recording(ZmqMessagePublisher[Tick]):
    """Records what on_error hears, then raises from it."""

    heard: list[tuple[BaseException, Tick]]

    def on_error(self, exc: BaseException, item: Tick) -> None:
        self.heard.append((exc, item))
        raise RuntimeError("on_error itself fails")


async def _send_until(raw: zmq.Socket[bytes], frame: bytes, condition: Any) -> None:
    """Send ``frame`` from a raw PUB until ``condition()``: a raw PUB cannot wait for the
    subscription, so it probes (with a deadline) until one frame got through."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, "no probe got through within 10 s"
        raw.send(frame)
        await asyncio.sleep(0.01)  # pacing the probes, with a deadline


# -- the send step -------------------------------------------------------------------------


async def test_a_union_of_tagged_structs_travels_on_one_socket(wirebus_address: str) -> None:
    codec: MsgspecCodec[Quote | Trade] = MsgspecCodec(Quote | Trade, topic="market")
    async with Collector(codec, wirebus_address) as subscriber:
        with ZmqMessagePublisher(codec, wirebus_address) as publisher:
            assert "Quote | " in repr(publisher)
            await publisher.wait_for_subscribers(timeout=10)
            publisher.publish_many([Quote(1.0), Trade(2.0), Quote(3.0)])
            await subscriber.wait_until(lambda: len(subscriber.items) == 3)
    assert subscriber.items == [Quote(1.0), Trade(2.0), Quote(3.0)]


@pytest.mark.parametrize("how", ["loop", "thread"])
async def test_an_item_that_fails_to_encode_is_dropped_alone(
    wirebus_address: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Item 5 cannot be encoded: the other nine arrive in order, on_error hears of it (and
    raising there, like the codec's raising repr, changes nothing), the publisher goes on,
    and close() returns."""
    items = [Tick(object() if seq == 5 else seq) for seq in range(10)]
    async with Collector(tick_codec(), wirebus_address) as subscriber:
        publisher = Recording(Unprintable(Tick, topic="tick"), wirebus_address)
        publisher.heard = []
        try:
            await publisher.wait_for_subscribers(timeout=10)
            if how == "loop":
                for item in items:
                    publisher.publish(item)
            else:
                await asyncio.to_thread(lambda: [publisher.publish(item) for item in items])
            await publisher.flush(timeout=10)
            publisher.publish(Tick(10))  # it goes on working
            await subscriber.wait_until(lambda: len(subscriber.items) == 10)
        finally:
            started = time.monotonic()
            publisher.close(timeout=5)
            assert time.monotonic() - started < 5
    assert [t.seq for t in subscriber.items] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert [item for _, item in publisher.heard] == [items[5]]
    assert isinstance(publisher.heard[0][0], TypeError)
    stats = publisher.stats
    assert (stats.published, stats.sent, stats.encode_errors, stats.pending) == (11, 10, 1, 0)
    assert any("on_error raised" in r.getMessage() for r in caplog.records)


def test_the_default_on_error_logs_a_few_times_and_counts_the_rest(
    wirebus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    with ZmqMessagePublisher(tick_codec(), wirebus_address) as publisher:
        publisher.publish_many(Tick(object()) for _ in range(500))
        publisher.close(timeout=5)
        assert publisher.stats.encode_errors == 500
    dropped = [r for r in caplog.records if "failed to encode" in r.getMessage()]
    assert 1 <= len(dropped) <= 10


async def test_a_run_encoder_that_breaks_its_contract_fails_the_publisher_not_close(
    wirebus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A codec whose run encoder returns a str: the run is lost (counted), the publisher
    refuses from then on naming why, and close() still returns."""

    class Broken(MsgspecCodec[Tick]):
        def run_encoding(self) -> Any:
            encoding = super().run_encoding()
            assert encoding is not None
            return type(encoding)(encoding.topic, lambda items: "not bytes")

    publisher = ZmqMessagePublisher(Broken(Tick, topic="tick"), wirebus_address)
    try:
        publisher.publish(Tick(1))  # idle: the loop sends it at once, and that fails
        with pytest.raises(RuntimeError, match=r"flush\(\) on failed"):
            await publisher.flush(timeout=5)
        with pytest.raises(RuntimeError, match=r"publish\(\) on failed") as refused:
            publisher.publish(Tick(2))
        assert isinstance(refused.value.__cause__, TypeError)
    finally:
        publisher.close(timeout=5)
    assert (publisher.stats.lost, publisher.stats.pending) == (1, 0)
    assert any("sending failed" in r.getMessage() for r in caplog.records)


def test_publish_checks_the_item_and_its_topic_at_the_call(wirebus_address: str) -> None:
    with ZmqMessagePublisher(tick_codec(), wirebus_address) as publisher:
        with pytest.raises(TypeError, match=r"encodes Tick, got str: 'not a tick'"):
            publisher.publish("not a tick")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"got int"):
            publisher.publish_many([Tick(1), 7])  # type: ignore[list-item]
        assert publisher.stats.published == 0  # publish_many queued none of them
    stringly = MsgspecCodec(Tick, topic=lambda tick: "x" * 32)  # type: ignore[arg-type,return-value]
    with (
        ZmqMessagePublisher(stringly, wirebus_address) as publisher,
        pytest.raises(TypeError, match=r"of type str; topics are bytes"),
    ):
        publisher.publish(Tick(1))


class RawPayload:
    """A codec without run encoding that sends whatever buffer it is given."""

    def encode(self, item: Any) -> tuple[bytes, Any]:
        return make_topic("raw"), item

    def decode(self, payload: bytes | memoryview) -> bytes:
        return bytes(payload)

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> bytes | None:
        raise exc


async def test_a_memoryview_payload_is_sent_as_its_bytes(wirebus_address: str) -> None:
    doubles = array.array("d", [1.5, 2.5, 3.5])
    async with Collector(RawPayload(), wirebus_address) as subscriber:
        with ZmqMessagePublisher(RawPayload(), wirebus_address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            publisher.publish(memoryview(doubles))  # 3 items, 24 bytes
            publisher.publish(bytearray(b"ba"))
            with pytest.raises(TypeError, match="payload of type str"):
                publisher.publish("text")
            await subscriber.wait_until(lambda: len(subscriber.items) == 2)
    assert subscriber.items == [doubles.tobytes(), b"ba"]
    assert subscriber.stats.malformed == 0


async def test_close_returns_by_its_deadline_with_items_it_cannot_deliver(
    wirebus_address: str,
) -> None:
    """A subscriber that reads nothing and a tiny hwm: close(timeout) still returns on time."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as stalled:
        stalled.setsockopt(zmq.RCVHWM, 1)
        stalled.setsockopt(zmq.RCVBUF, 4096)
        stalled.setsockopt(zmq.SUBSCRIBE, b"")
        stalled.connect(wirebus_address)
        publisher = ZmqMessagePublisher(tick_codec(), wirebus_address, max_batch_bytes=64)
        try:
            deadline = time.monotonic() + 10
            while publisher.subscriptions < 1:  # the raw SUB subscribes when it is polled
                stalled.poll(10)
                assert time.monotonic() < deadline
            publisher.publish_many(Tick("x" * 1000) for _ in range(5000))
        finally:
            started = time.monotonic()
            publisher.close(timeout=0.5)
            assert time.monotonic() - started < 3


# -- the subscriber ------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["ipc", "tcp"])
@pytest.mark.parametrize("subscriber_binds", [False, True])
async def test_an_oversized_message_never_cuts_a_subscriber_off_silently(
    wirebus_address: str, scheme: str, subscriber_binds: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """One message over max_message_size ends the connection; the subscriber counts and logs
    it, reconnects (whichever side connects), and what was lost shows up as dropped."""
    caplog.set_level(logging.INFO, logger="wirebus.transport")
    address = wirebus_address if scheme == "ipc" else "tcp://127.0.0.1:*"
    async with contextlib.AsyncExitStack() as stack:
        if subscriber_binds:
            subscriber = Collector(tick_codec(), address, connect=False, max_message_size=500)
            await stack.enter_async_context(subscriber)
            publisher = ZmqMessagePublisher(tick_codec(), subscriber.address, bind=False)
            stack.enter_context(publisher)
        else:
            publisher = stack.enter_context(ZmqMessagePublisher(tick_codec(), address))
            subscriber = Collector(tick_codec(), publisher.address, max_message_size=500)
            await stack.enter_async_context(subscriber)
        await publisher.wait_for_subscribers(timeout=10)
        publisher.publish(Tick(0))
        await subscriber.wait_until(lambda: len(subscriber.items) == 1)
        publisher.publish(Tick("x" * 2000))  # over the limit: the connection ends
        await subscriber.wait_until(lambda: subscriber.stats.disconnects >= 1)
        seq = 2
        deadline = time.monotonic() + 15
        while len(subscriber.items) < 2:  # published until one arrives: it reconnected
            assert time.monotonic() < deadline, subscriber.stats
            publisher.publish(Tick(seq))
            seq += 1
            await asyncio.sleep(0.01)  # pacing the probe items, with a deadline
    stats = subscriber.stats
    last = subscriber.items[-1].seq
    assert stats.received + stats.dropped == last + 1
    assert stats.dropped >= 1  # the oversized item, at least
    assert any("connection lost" in r.getMessage() for r in caplog.records)


async def test_forged_frames_cannot_grow_the_sequence_table_or_fake_drops(
    wirebus_address: str,
) -> None:
    payload = tick_codec().encode(Tick(1))[1]
    topic = make_topic("tick")
    ctx = zmq.Context.instance()
    async with Collector(tick_codec(), wirebus_address, connect=False) as subscriber:
        with ctx.socket(zmq.PUB) as raw:
            raw.connect(wirebus_address)
            raw.setsockopt(zmq.SNDHWM, 0)
            await _send_until(
                raw, build_frame(topic, 1, 0, [payload]), lambda: bool(subscriber.items)
            )
            base = subscriber.stats.received
            raw.send(build_frame(topic, 2, 0, [payload]))
            raw.send(build_frame(topic, 2, 2**63, [payload]))  # an implausible jump
            for publisher_id in range(100, 100 + _decoder.MAX_TRACKED + 500):
                raw.send(build_frame(topic, publisher_id, 0, [payload], run=True))
            total = base + 2 + _decoder.MAX_TRACKED + 500
            await subscriber.wait_until(lambda: subscriber.stats.received == total)
    assert subscriber.stats.resets == 1
    assert subscriber.stats.dropped < 1000  # the probes the slow joiner missed, no more
    assert subscriber._decoder.tracked == _decoder.MAX_TRACKED


async def test_the_length_table_is_honoured_even_when_the_run_would_decode(
    wirebus_address: str,
) -> None:
    """Two records with lengths [len+3, len-3]: item-by-item decoding rejects both."""
    one, two = (tick_codec().encode(Tick(n))[1] for n in (1, 2))
    lying = [one + two[:3], two[3:]]
    ctx = zmq.Context.instance()
    async with Collector(tick_codec(), wirebus_address, connect=False) as subscriber:
        with ctx.socket(zmq.PUB) as raw:
            raw.connect(wirebus_address)
            await _send_until(
                raw, build_frame(make_topic("tick"), 1, 0, [one]), lambda: bool(subscriber.items)
            )
            raw.send(build_frame(make_topic("tick"), 2, 0, lying))
            await subscriber.wait_until(lambda: subscriber.stats.decode_errors == 2)
    assert all(item == Tick(1) for item in subscriber.items)


async def test_receive_on_a_subscriber_never_started_says_so(wirebus_address: str) -> None:
    with ZmqMessageSubscriber(tick_codec(), wirebus_address) as subscriber:
        with pytest.raises(RuntimeError, match=r"never started: use 'async with'"):
            await subscriber.receive(timeout=1)
        with pytest.raises(RuntimeError, match="never started"):
            await anext(aiter(subscriber))


async def test_a_flood_of_garbage_is_logged_a_few_times_and_counted_in_full(
    wirebus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = zmq.Context.instance()
    async with Collector(tick_codec(), wirebus_address, connect=False) as subscriber:
        subscriber.on_error = ZmqMessageSubscriber.on_error.__get__(subscriber)  # the default
        with ctx.socket(zmq.PUB) as raw:
            raw.connect(wirebus_address)
            await _send_until(raw, b"garbage", lambda: bool(subscriber.stats.malformed))
            for _ in range(1000):
                raw.send(b"garbage")
            await subscriber.wait_until(lambda: subscriber.stats.malformed >= 1000)
    logged = [r for r in caplog.records if "malformed message" in r.getMessage()]
    assert 1 <= len(logged) <= 10


def test_the_rate_limited_log_says_how_many_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RateLimitedLog(burst=2, period=0.05)
    for n in range(5):
        log(logging.WARNING, f"message {n}")
    time.sleep(0.06)  # the window itself is what is tested: let it pass
    log(logging.WARNING, "message 5")
    assert [r.getMessage() for r in caplog.records] == [
        "message 0",
        "message 1",
        "3 similar message(s) suppressed",
        "message 5",
    ]


# -- without an event loop -----------------------------------------------------------------


def test_a_blocking_receive_for_code_without_an_event_loop(wirebus_address: str) -> None:
    codec = tick_codec()
    with (
        ZmqMessageSubscriber(codec, wirebus_address) as subscriber,
        ZmqMessagePublisher(codec, wirebus_address) as publisher,
    ):
        with pytest.raises(TimeoutError, match=r"nothing arrived within 0\.05 s"):
            subscriber.receive_blocking(timeout=0.05)  # and it subscribes meanwhile
        deadline = time.monotonic() + 10
        while publisher.subscriptions < 1:
            assert time.monotonic() < deadline
            with pytest.raises(TimeoutError):
                subscriber.receive_blocking(timeout=0.01)
        sender = threading.Thread(target=lambda: publisher.publish_many(map(Tick, range(500))))
        sender.start()
        got = [subscriber.receive_blocking(timeout=10) for _ in range(3)]
        got += list(itertools.islice(subscriber.iter_blocking(timeout=10), 497))
        sender.join()
    assert [t.seq for t in got] == list(range(500))


async def test_a_blocking_subscriber_cannot_also_run_in_a_loop(wirebus_address: str) -> None:
    class Waiting(ZmqMessageSubscriber[Tick]):
        async def process(self, items: list[Tick]) -> None:
            await asyncio.sleep(0)

    with ZmqMessageSubscriber(tick_codec(), wirebus_address) as subscriber:
        with pytest.raises(TimeoutError):
            subscriber.receive_blocking(timeout=0.01)
        with pytest.raises(RuntimeError, match="receive_blocking"):
            await subscriber.start()
    async with ZmqMessageSubscriber(tick_codec(), wirebus_address) as started:
        with pytest.raises(RuntimeError, match="await receive"):
            started.receive_blocking(timeout=0.01)
    with (
        Waiting(tick_codec(), wirebus_address) as waiting,
        ZmqMessagePublisher(tick_codec(), wirebus_address) as publisher,
    ):
        deadline = time.monotonic() + 10
        with pytest.raises(RuntimeError, match="awaited something"):  # noqa: PT012
            while True:
                assert time.monotonic() < deadline
                publisher.publish(Tick(1))
                with pytest.raises(TimeoutError):
                    waiting.receive_blocking(timeout=0.01)


# -- the wire format, both forms, both directions ------------------------------------------


async def test_raw_peers_and_wirebus_speak_both_forms(wirebus_address: str) -> None:
    """A raw SUB parses the run form (run-encoding codec) and the table form (any other
    codec); a wirebus subscriber reads a raw PUB's run form, table form and version 1."""
    ctx = zmq.Context.instance()
    with ctx.socket(zmq.SUB) as raw:
        raw.setsockopt(zmq.SUBSCRIBE, b"")
        raw.connect(wirebus_address)
        for codec, form in ((tick_codec(), "run"), (RawPayload(), "table")):
            with ZmqMessagePublisher(codec, wirebus_address) as publisher:
                deadline = time.monotonic() + 10
                while publisher.subscriptions < 1:
                    raw.poll(10)  # a raw SUB subscribes when it is polled
                    assert time.monotonic() < deadline
                item = Tick(7) if form == "run" else b"opaque"
                publisher.publish_many([item, item])
                assert raw.poll(10_000)
                frame = raw.recv()
            assert frame[33] == (1 if form == "run" else 0)  # the flags byte
            _, _, first, payloads = parse_frame(frame)
            assert first == 0
            assert payloads == [codec.encode(item)[1]] * 2  # type: ignore[attr-defined]
    payload = tick_codec().encode(Tick(3))[1]
    async with Collector(tick_codec(), wirebus_address, connect=False) as subscriber:
        with ctx.socket(zmq.PUB) as pub:
            pub.connect(wirebus_address)
            await _send_until(
                pub,
                build_frame(make_topic("tick"), 5, 0, [payload]),
                lambda: bool(subscriber.items),
            )
            pub.send(build_frame(make_topic("tick"), 6, 0, [payload] * 3, run=True))
            pub.send(build_frame(make_topic("tick"), 7, 0, [payload] * 2, version=1))
            await subscriber.wait_until(lambda: subscriber.stats.received >= 6)
    assert subscriber.stats.malformed == subscriber.stats.decode_errors == 0


# -- found in review: hangs and leaks at close, a stranded item, a timeout that never came --


class SlowPayload(RawPayload):
    """A codec without run encoding whose encode takes a while."""

    def encode(self, item: Any) -> tuple[bytes, Any]:
        time.sleep(0.3)  # the slow encode is the point: close() runs meanwhile
        return super().encode(item)


def test_a_publish_that_loses_the_race_with_close_returns(wirebus_address: str) -> None:
    publisher = ZmqMessagePublisher(SlowPayload(), wirebus_address)
    publishing = threading.Thread(target=publisher.publish, args=[b"late"], daemon=True)
    publishing.start()  # past the open check, encoding, when close() runs
    publisher.close(timeout=5)
    publishing.join(timeout=5)
    assert not publishing.is_alive(), "publish() after close() spun for ever"


async def test_an_item_published_while_subscriptions_are_read_is_sent(
    wirebus_address: str,
) -> None:
    async with Collector(tick_codec(), wirebus_address) as subscriber:
        with ZmqMessagePublisher(tick_codec(), wirebus_address) as publisher:
            await publisher.wait_for_subscribers(timeout=10)
            with publisher._send_lock:  # as `subscriptions` holds it while it reads
                await asyncio.to_thread(publisher.publish, Tick(1))  # cannot send: queued
            assert publisher.subscriptions == 1  # it releases the lock and looks again
            await subscriber.wait_until(lambda: subscriber.items == [Tick(1)], timeout=5)


async def test_close_with_no_time_to_wait_leaks_nothing(wirebus_address: str) -> None:
    for n in range(20):  # each its own address: a replay socket may close just after
        ZmqMessagePublisher(tick_codec(), f"{wirebus_address}{n}", replay=10).close(timeout=0)
    deadline = time.monotonic() + 10
    while any(t.name.startswith("wirebus-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a publisher's threads did not end"
        await asyncio.sleep(0.01)  # the threads end after close(): the fd check follows


async def test_on_error_that_closes_the_publisher_does_not_deadlock(
    wirebus_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Closing(ZmqMessagePublisher[Tick]):
        def on_error(self, exc: BaseException, item: Tick) -> None:
            self.close()

    publisher = Closing(tick_codec(), wirebus_address)
    try:
        await asyncio.wait_for(asyncio.to_thread(publisher.publish, Tick(object())), 10)
        publisher.publish(Tick(1))  # still open: the close from inside was refused
    finally:
        publisher.close(timeout=5)
    assert any("from inside its send step" in r.getMessage() for r in caplog.records)


def test_close_returns_by_its_deadline_while_runs_encode_slowly(wirebus_address: str) -> None:
    class Slow(MsgspecCodec[Tick]):
        def run_encoding(self) -> Any:
            encoding = super().run_encoding()
            assert encoding is not None

            def encode(items: Any) -> bytes:
                time.sleep(0.2)  # a slow run: what close(timeout) must not wait out
                return encoding.encode(items)

            return type(encoding)(encoding.topic, encode, encoding.item_type)

    topics = [make_topic(f"t{n}") for n in range(20)]
    codec = Slow(Tick, topic=lambda tick: topics[tick.seq])
    publisher = ZmqMessagePublisher(codec, wirebus_address)
    publisher._send_lock.acquire()  # nothing goes out before close(): 20 runs of one item
    publisher.publish_many(Tick(n) for n in range(20))
    publisher._send_lock.release()
    started = time.monotonic()
    publisher.close(timeout=0.5)
    assert time.monotonic() - started < 2.5  # 20 runs would take 4 s
    assert publisher.stats.sent < 20


FLOOD = """
import sys, time, zmq
ctx = zmq.Context(); pub = ctx.socket(zmq.PUB); pub.connect(sys.argv[1])
deadline = time.monotonic() + 8
while time.monotonic() < deadline:
    pub.send(b"garbage")
pub.close(linger=0); ctx.term()
"""


def test_receive_blocking_times_out_under_a_stream_of_garbage(wirebus_address: str) -> None:
    """Messages keep coming and none is an item: the timeout still ends the wait."""
    with ZmqMessageSubscriber(tick_codec(), wirebus_address, connect=False) as subscriber:
        subscriber.on_error = ZmqMessageSubscriber.on_error.__get__(subscriber)  # the default
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, wirebus_address])
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                subscriber.receive_blocking(timeout=2)
            assert time.monotonic() - started < 5  # not only once the flood stops (8 s)
            assert subscriber.stats.malformed > 1000, "the flood never got going"
        finally:
            flood.kill()
            flood.wait(timeout=10)
