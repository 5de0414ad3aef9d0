"""Replay and recovery (issue 12), with real sockets and processes: the publisher's replay
endpoint spoken to by hand from docs/wire-format.md, bad and hostile requests, CURVE on the
replay endpoint, and subscribers that get back what they missed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from _peers import Peer, announced_endpoint, parse_frame
from _support import wait_until_async
from test_security import client, keys, server  # noqa: F401  (keys is a fixture)
from wirebus import (
    EventRecord,
    EventRecordCodec,
    SampleEventType,
    SessionEventType,
    ZmqMessagePublisher,
    ZmqMessageSubscriber,
    make_topic,
)
from wirebus.testing import CollectingSubscriber

PEERS = str(Path(__file__).with_name("_replay_peers.py"))
SAMPLE = make_topic("sample")

# The replay protocol written by hand from docs/wire-format.md (not imported from _wire).
_REQUEST = struct.Struct("<BBHIQQ")
_REPLY = struct.Struct("<BBHI")
_END = struct.Struct("<QB")
ITEMS, END, ERROR = 2, 3, 4


def request(topic: bytes, request_id: int, first: int, end: int) -> bytes:
    return topic + _REQUEST.pack(2, 1, 0, request_id, first, end)


def since_request(
    request_id: int, items: int, cursor: int, starts: dict[bytes, int] | None = None
) -> bytes:
    entries = b"".join(struct.pack("<32sQ", t, seq) for t, seq in (starts or {}).items())
    return bytes(32) + _REQUEST.pack(2, 5, 0, request_id, items, cursor) + entries


def since(dealer: zmq.Socket[bytes], items: int, starts: dict[bytes, int] | None = None) -> list:
    """Ask with since requests until the end marker says there is no more; the items got, as
    (topic, timestamp)."""
    codec = EventRecordCodec()
    got, cursor, more = [], 0, 1
    while more:
        replies = ask(dealer, since_request(7, items, cursor, starts))
        assert {request_id for _, request_id, _ in replies} == {7}
        for kind, _id, body in replies[:-1]:
            assert kind == ITEMS
            topic, _publisher, _first, payloads = parse_frame(body)
            got += [(topic, codec.decode(payload).timestamp_ns) for payload in payloads]
        cursor, more = _END.unpack(replies[-1][2])
    return got


def records(start: int, stop: int) -> list[EventRecord]:
    return [EventRecord(SampleEventType.ISSUED, timestamp_ns=i) for i in range(start, stop)]


@pytest.fixture
def dealer() -> Iterator[zmq.Socket[bytes]]:
    with zmq.Context() as context, context.socket(zmq.DEALER) as sock:
        sock.linger = 0
        yield sock


def ask(sock: zmq.Socket[bytes], message: bytes) -> list[tuple[int, int, bytes]]:
    """Send one request; the replies ``(kind, request id, body)`` up to and with the end
    marker or an error."""
    sock.send(message)
    replies = []
    while True:
        assert sock.poll(10_000), f"no reply after {replies}"
        header, body = sock.recv_multipart()
        _version, kind, _reserved, request_id = _REPLY.unpack(header)
        replies.append((kind, request_id, body))
        if kind in (END, ERROR):
            return replies


def replayed(replies: list[tuple[int, int, bytes]]) -> list[int]:
    """The timestamps (= sequence numbers here) of the items in ``ITEMS`` replies."""
    codec = EventRecordCodec()
    seqs = []
    for kind, _id, body in replies:
        if kind == ITEMS:
            topic, _publisher, first, payloads = parse_frame(body)
            assert topic == SAMPLE
            for i, payload in enumerate(payloads):
                assert codec.decode(payload).timestamp_ns == first + i
                seqs.append(first + i)
    return seqs


# -- the publisher's replay endpoint ---------------------------------------------------------


async def test_replay_serves_the_newest_items_as_the_messages_sent(
    wirebus_address: str, dealer: zmq.Socket[bytes]
) -> None:
    with ZmqMessagePublisher(EventRecordCodec(), wirebus_address, replay=300) as publisher:
        assert publisher.replay_address == f"{wirebus_address}.replay"
        publisher.publish_many(records(0, 1000))
        await publisher.flush(timeout=10)
        dealer.connect(publisher.replay_address)
        replies = ask(dealer, request(SAMPLE, 41, 0, 2000))
        # whole messages holding at least the newest 300 items, then the end marker
        seqs = replayed(replies)
        assert seqs == list(range(seqs[0], 1000))
        assert 300 <= len(seqs) < 300 + 128
        assert {request_id for _, request_id, _ in replies} == {41}
        assert replies[-1][0] == END
        assert _END.unpack(replies[-1][2]) == (1000, 0)
        for _kind, _id, body in replies[:-1]:
            assert announced_endpoint(body) == publisher.replay_address.encode()
        # a range inside the buffer: only the messages that hold it
        inside = replayed(ask(dealer, request(SAMPLE, 42, 900, 901)))
        assert 900 in inside
        assert len(inside) <= 128
        # another topic: nothing, and the end marker says so
        assert ask(dealer, request(make_topic("other"), 43, 0, 10)) == [(END, 43, _END.pack(0, 0))]


def interleaved(n: int) -> list[EventRecord]:
    """Records on two topics (session and sample events), numbered by timestamp 0..n-1."""
    return [
        EventRecord(
            SessionEventType.START_PERFORMANCE_TRACKING if i % 7 == 0 else SampleEventType.ISSUED,
            i,
        )
        for i in range(n)
    ]


async def test_a_since_request_gets_every_topic_in_the_order_sent(
    wirebus_address: str, dealer: zmq.Socket[bytes]
) -> None:
    codec = EventRecordCodec()
    session = make_topic("session")
    with ZmqMessagePublisher(codec, wirebus_address, replay=1000) as publisher:
        for record in interleaved(700):  # one message each: the topics alternate
            publisher.publish(record)
            await publisher.flush(timeout=10)
        dealer.connect(publisher.replay_address)
        # a history: the newest 50 of each topic, in the order sent
        got = since(dealer, 50)
        samples = [i for i in range(700) if i % 7]
        stamps = [stamp for _topic, stamp in got]
        assert stamps == sorted(stamps)
        assert [t for topic, t in got if topic == session] == list(range(0, 700, 7))[-50:]
        assert [t for topic, t in got if topic == SAMPLE] == samples[-50:]
        # from given positions: the session topic from its item 90, the sample topic from 500
        got = since(dealer, 0, {session: 90, SAMPLE: 500})
        expected = sorted([*range(630, 700, 7), *samples[500:]])
        assert [t for _topic, t in got] == expected
        # what cannot be a since request
        for bad in (since_request(8, 0, 0), since_request(8, 1, 0) + b"x" * 39):
            [(kind, request_id, text)] = ask(dealer, bad)
            assert (kind, request_id) == (ERROR, 0)
            assert b"since request" in text


async def test_history_delivers_a_publishers_topics_in_the_order_it_sent_them(
    wirebus_address: str,
) -> None:
    codec = EventRecordCodec()
    with ZmqMessagePublisher(codec, wirebus_address, replay=1000) as publisher:
        sent = interleaved(300)
        for record in sent:
            publisher.publish(record)
            await publisher.flush(timeout=10)
        async with CollectingSubscriber(codec, wirebus_address, history=1000) as late:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish(EventRecord(SampleEventType.ISSUED, 300))
            await late.wait_for(301)
            # the live message that started it came with the history: it is skipped
            await late.wait_until(lambda: late.stats.duplicates == 1)
    assert [r.timestamp_ns for r in late.items] == list(range(301))  # not topic by topic
    stats = late.stats
    assert (stats.received, stats.recovered, stats.dropped) == (301, 301, 0), stats


async def test_bad_huge_and_flood_requests_leave_the_publisher_working(
    wirebus_address: str, dealer: zmq.Socket[bytes]
) -> None:
    n = 20_000
    with ZmqMessagePublisher(EventRecordCodec(), wirebus_address, replay=n) as publisher:
        publisher.publish_many(records(0, n))
        await publisher.flush(timeout=10)
        dealer.connect(publisher.replay_address)
        for bad in (b"garbage", request(SAMPLE, 1, 0, 10)[:-1], request(SAMPLE, 1, 10, 10)):
            [(kind, request_id, text)] = ask(dealer, bad)
            assert (kind, request_id) == (ERROR, 0)
            assert text
        # a range as large as a request can say: one chunk of messages, and "more"
        huge = ask(dealer, request(SAMPLE, 2, 0, 2**64 - 1))
        assert 0 < len(huge) - 1 <= 64
        after, more = _END.unpack(huge[-1][2])
        assert more == 1
        assert after == replayed(huge)[-1] + 1
        # a flood that never reads its answers, while a subscriber gets live items
        async with CollectingSubscriber(EventRecordCodec(), publisher.address) as subscriber:
            await publisher.wait_for_subscribers(1, timeout=10)
            with zmq.Context() as context, context.socket(zmq.DEALER) as flood:
                flood.linger = 0
                flood.connect(publisher.replay_address)
                accepted = 0
                for i in range(5000):  # until ZMQ pushes back: what a flood can queue is bounded
                    with contextlib.suppress(zmq.Again):
                        flood.send(request(SAMPLE, i, 0, 2**64 - 1), zmq.NOBLOCK)
                        flood.send(os.urandom(i % 100), zmq.NOBLOCK)
                        accepted += 1
                assert accepted < 5000
                publisher.publish_many(records(n, 2 * n))
                await subscriber.wait_for(n, timeout=20)
        assert [r.timestamp_ns for r in subscriber.items] == list(range(n, 2 * n))
        assert subscriber.stats.dropped == n  # the first n were published before it joined
        # the endpoint still answers a well-behaved peer
        assert replayed(ask(dealer, request(SAMPLE, 3, 2 * n - 5, 2 * n)))[-1] == 2 * n - 1


async def test_the_replay_endpoint_applies_the_curve_allow_list(
    keys: dict[str, tuple[bytes, bytes]],  # noqa: F811
    dealer: zmq.Socket[bytes],
) -> None:
    curve = server(keys, "client")
    with ZmqMessagePublisher(
        EventRecordCodec(), "tcp://127.0.0.1:*", curve=curve, replay=100
    ) as publisher:
        assert publisher.replay_address is not None
        assert publisher.replay_address.startswith("tcp://127.0.0.1:")
        publisher.publish_many(records(0, 10))
        await publisher.flush(timeout=10)
        with zmq.Context() as context:
            answers = {}
            for who in ("client", "intruder"):
                with context.socket(zmq.DEALER) as sock:
                    sock.linger = 0
                    key = client(keys, who)
                    sock.curve_serverkey = key.server_public_key
                    sock.curve_publickey, sock.curve_secretkey = key.public_key, key.secret_key
                    sock.connect(publisher.replay_address)
                    sock.send(request(SAMPLE, 1, 0, 10))
                    answers[who] = sock.poll(1000 if who == "intruder" else 10_000)
            # a plain peer (no CURVE at all) is refused as well
            dealer.connect(publisher.replay_address)
            dealer.send(request(SAMPLE, 1, 0, 10))
            answers["plain"] = dealer.poll(500)
    assert answers == {"client": zmq.POLLIN, "intruder": 0, "plain": 0}


def test_replay_settings_that_cannot_work_are_refused(
    wirebus_address: str,
    keys: dict[str, tuple[bytes, bytes]],  # noqa: F811
) -> None:
    codec = EventRecordCodec()
    with pytest.raises(ValueError, match="replay must be"):
        ZmqMessagePublisher(codec, wirebus_address, replay=-1)
    with pytest.raises(ValueError, match="conflate"):
        ZmqMessagePublisher(codec, wirebus_address, replay=10, conflate=True)
    with pytest.raises(ValueError, match="CURVE client"):
        ZmqMessagePublisher(
            codec, "tcp://127.0.0.1:1", bind=False, replay=10, curve=client(keys, "client")
        )
    with pytest.raises(ValueError, match="replay_address"):
        ZmqMessagePublisher(codec, "tcp://10.1.2.3:5555", bind=False, replay=10)
    with ZmqMessagePublisher(codec, wirebus_address) as publisher:
        assert publisher.replay_address is None


# -- recovery --------------------------------------------------------------------------------


class Gated(CollectingSubscriber[EventRecord]):
    """A subscriber whose process() waits while ``gate`` is clear: a stalled consumer."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(EventRecordCodec(), address, **options)
        self.gate = asyncio.Event()
        self.gate.set()

    async def process(self, items: list[EventRecord]) -> None:
        await self.gate.wait()
        await super().process(items)


class Checkpointing(Gated):
    """Notes, in every process(), its position against the items handed over so far."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(address, **options)
        self.checkpoints: list[tuple[int, dict[tuple[int, bytes], int]]] = []

    async def process(self, items: list[EventRecord]) -> None:
        await super().process(items)
        self.checkpoints.append((len(self.items), self.position))


async def test_a_stalled_subscriber_gets_back_every_item_a_small_sndhwm_dropped(
    wirebus_address: str,
) -> None:
    peer = Peer(PEERS, "publish", wirebus_address, "100000", "10")
    try:
        await peer.wait_for(lambda state: "replay" in state, timeout=20)
        async with Checkpointing(wirebus_address, rcvhwm=10, recover=True) as subscriber:
            peer.send("1")
            await subscriber.wait_for(1)
            subscriber.gate.clear()  # stalled from its next batch on
            peer.send("20000")
            await peer.wait_for(lambda state: state.get("published") == 20_001, timeout=30)
            peer.send("1")  # a gap shows once a later item arrives
            await peer.wait_for(lambda state: state.get("published") == 20_002, timeout=30)
            subscriber.gate.set()
            await subscriber.wait_for(20_002, timeout=30)
            peer.send("stop")
            await peer.finish()
    finally:
        peer.close()
    assert [r.timestamp_ns for r in subscriber.items] == list(range(20_002))
    stats = subscriber.stats
    assert stats.recovered > 0, stats  # the hwm did drop items: they came back through replay
    assert (stats.received, stats.dropped) == (20_002, 0), stats
    # one publisher, one topic, items numbered from 0: inside every process(), the position
    # is the count handed over so far, a recovery under way included
    for handed, position in subscriber.checkpoints:
        assert list(position.values()) == [handed], (handed, position)


async def test_what_an_hwm_dropped_on_several_topics_comes_back_in_the_order_sent(
    wirebus_address: str,
) -> None:
    sent = interleaved(12_000)  # session and sample events, one message each
    codec = EventRecordCodec()
    with ZmqMessagePublisher(
        codec, wirebus_address, replay=100_000, sndhwm=10, max_batch_bytes=1
    ) as publisher:
        async with Gated(wirebus_address, rcvhwm=10, recover=True) as subscriber:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish(sent[0])
            await subscriber.wait_for(1)
            subscriber.gate.clear()  # stalled: the reader's buffer and both hwms fill, then drop
            publisher.publish_many(sent[1:-2])
            await publisher.flush(timeout=20)
            subscriber.gate.set()
            publisher.publish_many(sent[-2:])
            await subscriber.wait_for(len(sent), timeout=30)
    assert [r.timestamp_ns for r in subscriber.items] == list(range(len(sent)))
    stats = subscriber.stats
    assert stats.recovered > 0, stats  # the hwm did drop, on both topics
    assert (stats.received, stats.dropped) == (len(sent), 0), stats


async def test_a_publisher_killed_during_recovery_costs_its_gap_and_holds_up_nobody(
    wirebus_address: str,
) -> None:
    codec = EventRecordCodec()
    replay_address = f"{wirebus_address}.vanish"
    async with CollectingSubscriber(
        codec, wirebus_address, connect=False, recover=True, recover_timeout=3.0
    ) as subscriber:
        peer = Peer(PEERS, "vanish", wirebus_address, replay_address)
        try:
            # item 0 arrives, item 5 shows a gap: the subscriber asks, and the publisher dies
            await peer.wait_for(lambda state: "asked" in state, timeout=20)
            await asyncio.to_thread(peer.proc.wait, 10)
        finally:
            peer.close()

        def of(name: str) -> list[int]:
            return [r.timestamp_ns for r in subscriber.items if r.sample_uuid == name]

        with ZmqMessagePublisher(codec, wirebus_address, bind=False) as other:
            await other.wait_for_subscribers(1, timeout=10)
            for record in records(0, 100):
                other.publish(EventRecord(record.event_type, record.timestamp_ns, "live"))
            await subscriber.wait_until(lambda: len(of("live")) == 100)
        # the other publisher's items went by while the dead one's item 5 was held back
        assert of("vanish") == [0]
        assert subscriber.stats.dropped == 0
        await subscriber.wait_until(lambda: of("vanish") == [0, 5])
    assert of("live") == list(range(100))
    assert (subscriber.stats.dropped, subscriber.stats.recovered) == (4, 0)


def test_recovery_settings_that_cannot_work_are_refused(wirebus_address: str) -> None:
    codec = EventRecordCodec()
    with pytest.raises(ValueError, match="history must be"):
        ZmqMessageSubscriber(codec, wirebus_address, history=-1)
    with pytest.raises(ValueError, match="recover_timeout"):
        ZmqMessageSubscriber(codec, wirebus_address, recover=True, recover_timeout=0)
    with pytest.raises(ValueError, match="conflate"):
        ZmqMessageSubscriber(codec, wirebus_address, recover=True, conflate=True)
    subscriber = ZmqMessageSubscriber(codec, wirebus_address, recover=True)
    with subscriber, pytest.raises(RuntimeError, match="event loop"):
        subscriber.receive_blocking(timeout=0.01)


async def test_a_subscriber_killed_mid_stream_and_restarted_with_history_misses_nothing_kept(
    wirebus_address: str,
) -> None:
    codec, kept = EventRecordCodec(), 500
    with ZmqMessagePublisher(codec, wirebus_address, replay=kept) as publisher:
        stop, enough = asyncio.Event(), asyncio.Event()
        published, target = 0, float("inf")

        async def stream() -> None:
            nonlocal published
            while not stop.is_set():
                publisher.publish_many(records(published, published + 20))
                published += 20
                if published >= target:
                    enough.set()
                await asyncio.sleep(0.001)

        streaming = asyncio.create_task(stream())
        first = Peer(PEERS, "subscribe", wirebus_address)
        try:
            await first.wait_for(lambda state: state.get("received", 0) > 100, timeout=20)
        finally:
            first.close()  # SIGKILL, mid-stream
        # more than the buffer keeps goes by before the restart: some history is gone
        target = first.state["received"] + 4 * kept
        await asyncio.wait_for(enough.wait(), 20)
        async with CollectingSubscriber(codec, wirebus_address, history=4 * kept) as restarted:
            await restarted.wait_for(kept + 1, timeout=20)
            stop.set()
            await streaming
            publisher.publish(records(published, published + 1)[0])
            await restarted.wait_until(lambda: restarted.items[-1].timestamp_ns == published)
    seqs = [r.timestamp_ns for r in restarted.items]
    start = seqs[0]
    assert seqs == list(range(start, published + 1))  # exactly once, in order
    stats = restarted.stats
    assert stats.recovered > 0  # what the buffer still held of the history asked for
    assert start > 0  # and what fell out of it ...
    assert stats.dropped == start  # ... is counted as dropped
    assert stats.received + stats.dropped == published + 1


async def test_fan_in_of_four_with_one_restarted_loses_nothing_of_the_others(
    wirebus_address: str,
) -> None:
    async with CollectingSubscriber(
        EventRecordCodec(), wirebus_address, connect=False, recover=True
    ) as subscriber:

        def of(name: str) -> list[int]:
            return [r.timestamp_ns for r in subscriber.items if r.sample_uuid == name]

        peers = {name: Peer(PEERS, "stream", wirebus_address, name) for name in "abcd"}
        try:
            await subscriber.wait_until(lambda: all(len(of(name)) > 100 for name in "abcd"))
            peers["d"].close()  # SIGKILL
            peers["e"] = Peer(PEERS, "stream", wirebus_address, "e")
            await subscriber.wait_until(lambda: len(of("e")) > 100)
            published = {}
            for name in "abce":
                peers[name].send("stop")
                published[name] = (await peers[name].finish())["published"]
            await subscriber.wait_until(
                lambda: all(len(of(name)) == published[name] for name in "abce")
            )
        finally:
            for peer in peers.values():
                peer.close()
    for name in "abce":
        assert of(name) == list(range(published[name])), name
    assert of("d") == list(range(len(of("d"))))  # in order up to where it was killed
    assert subscriber.stats.dropped == 0


# -- position and resume ---------------------------------------------------------------------


async def test_resume_from_a_stored_position_gets_the_rest_exactly_once(
    wirebus_address: str,
) -> None:
    codec = EventRecordCodec()
    with ZmqMessagePublisher(codec, wirebus_address, replay=10_000) as publisher:
        async with Checkpointing(wirebus_address, recover=True) as first:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(records(0, 1000))
            await first.wait_for(1000)
        # the last position "stored" lags what the first one got, as a periodic checkpoint does
        stored = next(position for handed, position in first.checkpoints if handed >= 300)
        (due,) = stored.values()
        assert 300 <= due < 1000
        await wait_until_async(lambda: publisher.subscriptions == 0, "the first one gone")
        publisher.publish_many(records(1000, 2000))  # nobody listens meanwhile
        await publisher.flush(timeout=10)
        async with CollectingSubscriber(
            codec, wirebus_address, recover=True, history=5000, resume=stored
        ) as second:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(records(2000, 2100))
            await second.wait_for(2100 - due)
    assert [r.timestamp_ns for r in second.items] == list(range(due, 2100))
    stats = second.stats
    assert (stats.received, stats.dropped) == (2100 - due, 0), stats
    assert stats.recovered >= 2000 - due, stats  # and what was also sent live came once


async def test_resume_catches_up_on_a_topic_whose_last_items_went_by_unheard(
    wirebus_address: str,
) -> None:
    codec = EventRecordCodec()
    with ZmqMessagePublisher(codec, wirebus_address, replay=100) as publisher:
        async with Checkpointing(wirebus_address, recover=True) as first:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(records(0, 10))
            await first.wait_for(10)
        stored = first.position
        await wait_until_async(lambda: publisher.subscriptions == 0, "the first one gone")
        publisher.publish_many(records(10, 20))  # the topic's last items: nobody hears them
        await publisher.flush(timeout=10)
        async with CollectingSubscriber(
            codec, wirebus_address, recover=True, resume=stored
        ) as second:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish(EventRecord(SessionEventType.ENDED, 99))  # another topic
            await second.wait_for(11)
    assert [(r.event_type, r.timestamp_ns) for r in second.items] == [
        *((SampleEventType.ISSUED, i) for i in range(10, 20)),
        (SessionEventType.ENDED, 99),
    ]
    assert (second.stats.recovered, second.stats.dropped) == (10, 0), (second.stats, stored)


async def test_resume_without_recover_counts_the_gap_as_dropped(wirebus_address: str) -> None:
    codec = EventRecordCodec()
    with ZmqMessagePublisher(codec, wirebus_address, replay=100) as publisher:
        publisher.publish_many(records(0, 60))  # nobody listens
        await publisher.flush(timeout=10)
        resume = {(publisher.publisher_id, SAMPLE): 40}
        async with CollectingSubscriber(codec, wirebus_address, resume=resume) as subscriber:
            await publisher.wait_for_subscribers(1, timeout=10)
            publisher.publish_many(records(60, 70))
            await subscriber.wait_for(10)
    assert [r.timestamp_ns for r in subscriber.items] == list(range(60, 70))
    assert (subscriber.stats.dropped, subscriber.stats.recovered) == (20, 0)


def test_a_resume_that_cannot_be_a_position_is_refused(wirebus_address: str) -> None:
    codec = EventRecordCodec()
    for bad in ({(1, b"short"): 0}, {(1, SAMPLE): -1}, {(2**64, SAMPLE): 0}, {(1, SAMPLE): "0"}):
        with pytest.raises(ValueError, match="resume maps") as caught:
            ZmqMessageSubscriber(codec, wirebus_address, resume=bad)  # type: ignore[arg-type]
        assert repr(next(iter(bad.values()))) in str(caught.value)
    with pytest.raises(TypeError, match=r"resume must be a mapping.*\[1, 2\]"):
        ZmqMessageSubscriber(codec, wirebus_address, resume=[1, 2])  # type: ignore[arg-type]
