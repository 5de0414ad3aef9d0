"""Fan-in, fan-out and restarts, with real processes: order and gap accounting per publisher.

Fan-in: M publisher processes connect (``bind=False``) to one bound subscriber
(``connect=False``). Fan-out: one publisher binds, N subscriber processes connect. Restarts:
a subscriber process SIGKILLed and replaced mid-stream, an aggregator process SIGKILLed and
restarted on the same ipc path, a bound subscriber closed and bound again; what was missed is
counted in ``stats.dropped``, never hidden.

This file is also the peer script: ``python tests/test_topologies.py publish|subscribe ...``
(``tests/test_netns.py`` uses :class:`Peer` too).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator

import msgspec
import pytest
import zmq

from _peers import Peer, stdin_says_stop
from _support import wait_until_async
from wirebus import MsgspecCodec
from wirebus.testing import CollectingSubscriber
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber


class Tick(msgspec.Struct):
    source: int
    seq: int


CODEC = MsgspecCodec(Tick, topic="tick")


@pytest.fixture
def peers() -> Iterator[list[Peer]]:
    made: list[Peer] = []
    yield made
    for peer in made:
        peer.close()


def _peer(peers: list[Peer], *args: str) -> Peer:
    peer = Peer(__file__, *args)
    peers.append(peer)
    return peer


class Collector(CollectingSubscriber[Tick]):
    """The plugin's collecting subscriber, for ticks."""


def by_source(items: list[Tick]) -> dict[int, list[int]]:
    seqs: dict[int, list[int]] = {}
    for item in items:
        seqs.setdefault(item.source, []).append(item.seq)
    return seqs


@contextlib.asynccontextmanager
async def publishing(
    publishers: list[ZmqMessagePublisher[Tick]],
) -> AsyncIterator[Callable[[], list[int]]]:
    """Publish Tick(source, seq) from every publisher, 10 per 2 ms each, until the block ends.

    Yields a function returning the next seq of each source (how many each has published).
    """
    next_seq = [0] * len(publishers)
    stop = asyncio.Event()

    async def run() -> None:
        while not stop.is_set():
            for source, publisher in enumerate(publishers):
                for _ in range(10):
                    publisher.publish(Tick(source, next_seq[source]))
                    next_seq[source] += 1
            await asyncio.sleep(0.002)  # pacing the load, not synchronisation

    task = asyncio.create_task(run())
    try:
        yield lambda: list(next_seq)
    finally:
        stop.set()
        await task


# -- fan-in and fan-out ----------------------------------------------------------------------


async def test_fan_in_four_publisher_processes_one_bound_subscriber(
    wirebus_address: str, peers: list[Peer]
) -> None:
    n, m = 25_000, 4
    async with Collector(CODEC, wirebus_address, connect=False) as aggregator:
        for source in range(m):
            _peer(peers, "publish", wirebus_address, str(n), str(source))
        for peer in peers:
            await peer.finish(timeout=30)
        await aggregator.wait_until(lambda: len(aggregator.items) == m * n)
    seqs = by_source(aggregator.items)
    assert sorted(seqs) == list(range(m))
    for source in range(m):
        assert seqs[source] == list(range(n)), f"source {source} out of order or incomplete"
    assert aggregator.stats.received == m * n
    assert aggregator.stats.dropped == 0
    interleaved = sum(a.source != b.source for a, b in itertools.pairwise(aggregator.items))
    assert interleaved >= m - 1


async def test_fan_out_one_publisher_four_subscriber_processes(peers: list[Peer]) -> None:
    n, count = 25_000, 4
    with ZmqMessagePublisher(CODEC, "tcp://127.0.0.1:*") as publisher:
        subscribers = [
            _peer(peers, "subscribe", publisher.address, "connect", str(n)) for _ in range(count)
        ]
        await publisher.wait_for_subscribers(count, timeout=30)
        for seq in range(n):
            publisher.publish(Tick(0, seq))
        results = [await subscriber.finish(timeout=30) for subscriber in subscribers]
    for result in results:
        assert result["received"] == n, result
        assert result["dropped"] == 0, result
        assert result["ordered"], result
        assert result["first"] == {"0": 0}, result
        assert result["last"] == {"0": n - 1}, result


# -- restarts --------------------------------------------------------------------------------


async def test_killed_subscriber_process_is_replaced_mid_stream(peers: list[Peer]) -> None:
    """Fan-out over tcp: SIGKILL the subscriber; a new one counts what it missed as dropped."""
    with ZmqMessagePublisher(CODEC, "tcp://127.0.0.1:*") as publisher:
        first = _peer(peers, "subscribe", publisher.address, "connect", "0")
        await publisher.wait_for_subscribers(1, timeout=30)
        async with publishing([publisher]) as published:
            await first.wait_for(lambda s: s.get("received", 0) >= 100, timeout=10)
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 10)
            await wait_until_async(lambda: publisher.subscriptions == 0, "the unsubscription")
            killed_at = published()[0]
            second = _peer(peers, "subscribe", publisher.address, "connect", "0")
            await publisher.wait_for_subscribers(1, timeout=30)
            await second.wait_for(lambda s: s.get("received", 0) >= 100, timeout=10)
        final = published()[0] - 1
        await publisher.flush(timeout=10)
        await second.wait_for(lambda s: s["last"].get("0") == final, timeout=10)
        second.send("stop")
        result = await second.finish()
    assert result["ordered"]
    assert result["received"] + result["dropped"] == final + 1, result
    # first sight: everything before the new subscriber's first item is counted as dropped,
    # including what was published while no subscriber was there
    assert result["dropped"] == result["first"]["0"]
    assert result["first"]["0"] >= killed_at > 0


async def test_killed_aggregator_restarts_on_the_same_ipc_path(
    wirebus_address: str, peers: list[Peer]
) -> None:
    """Fan-in: the bound aggregator dies (its socket file stays); its successor binds the same
    path and the connected publishers find it by themselves."""
    first = _peer(peers, "subscribe", wirebus_address, "bind", "0")
    await first.wait_for(lambda s: "address" in s, timeout=15)
    publishers = [ZmqMessagePublisher(CODEC, wirebus_address, bind=False) for _ in range(2)]
    try:
        for publisher in publishers:
            await publisher.wait_for_subscribers(1, timeout=10)
        async with publishing(publishers) as published:
            await first.wait_for(lambda s: s.get("received", 0) >= 200, timeout=10)
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 10)
            await wait_until_async(
                lambda: all(p.subscriptions == 0 for p in publishers), "the unsubscriptions"
            )
            stale = wirebus_address.removeprefix("ipc://")
            assert await asyncio.to_thread(os.path.exists, stale)  # its socket file is left
            second = _peer(peers, "subscribe", wirebus_address, "bind", "0")
            for publisher in publishers:
                await publisher.wait_for_subscribers(1, timeout=10)  # they reconnected
            await second.wait_for(
                lambda s: all(s["last"].get(k, -1) >= 0 for k in ("0", "1")), timeout=10
            )
        finals = [seq - 1 for seq in published()]
        for publisher in publishers:
            await publisher.flush(timeout=10)
        await second.wait_for(
            lambda s: [s["last"].get(k) for k in ("0", "1")] == finals, timeout=10
        )
        second.send("stop")
        result = await second.finish()
    finally:
        for publisher in publishers:
            publisher.close(timeout=5)
    assert result["ordered"]
    assert result["received"] + result["dropped"] == sum(f + 1 for f in finals), result
    assert result["dropped"] == result["first"]["0"] + result["first"]["1"] > 0


async def test_bound_subscriber_closed_and_bound_again() -> None:
    """Fan-in over tcp in one process: the publishers reconnect to the new subscriber by
    themselves; the items published while it was away are counted as dropped."""
    before = Collector(CODEC, "tcp://127.0.0.1:*", connect=False)
    await before.start()
    address = before.address
    after: Collector | None = None
    publishers = [ZmqMessagePublisher(CODEC, address, bind=False) for _ in range(3)]
    try:
        for publisher in publishers:
            await publisher.wait_for_subscribers(1, timeout=10)
        async with publishing(publishers) as published:
            await before.wait_until(lambda: len(by_source(before.items)) == 3)
            await before.aclose()
            await wait_until_async(
                lambda: all(p.subscriptions == 0 for p in publishers), "the unsubscriptions"
            )
            away = published()
            await wait_until_async(
                lambda: min(a - b for a, b in zip(published(), away, strict=True)) >= 50,
                "50 more items from each publisher",
            )
            after = Collector(CODEC, address, connect=False)  # the same port again
            await after.start()
            for publisher in publishers:
                await publisher.wait_for_subscribers(1, timeout=10)
            await after.wait_until(lambda: len(by_source(after.items)) == 3)  # type: ignore[union-attr]
        finals = [seq - 1 for seq in published()]
        for publisher in publishers:
            await publisher.flush(timeout=10)
        await after.wait_until(
            lambda: [by_source(after.items)[k][-1] for k in range(3)] == finals  # type: ignore[union-attr]
        )
    finally:
        for publisher in publishers:
            publisher.close(timeout=5)
        await before.aclose()
        if after is not None:
            await after.aclose()
    old, new = by_source(before.items), by_source(after.items)
    missed = 0
    for source in range(3):
        assert old[source] == list(range(len(old[source])))  # in order, from 0
        assert new[source] == list(range(new[source][0], finals[source] + 1))  # in order
        missed += new[source][0] - len(old[source])
        assert new[source][0] >= away[source] + 50  # nothing published while away arrived
    assert missed > 0
    # the new subscriber saw each publisher first mid-stream: all before counts as dropped
    assert after.stats.dropped == sum(new[source][0] for source in range(3))
    assert after.stats.received + after.stats.dropped == sum(f + 1 for f in finals)


# -- heartbeats -----------------------------------------------------------------------------


def test_heartbeat_sets_the_zmtp_options(wirebus_address: str) -> None:
    with ZmqMessageSubscriber(CODEC, wirebus_address, heartbeat=200) as subscriber:
        sock = subscriber._socket
        assert sock.getsockopt(zmq.HEARTBEAT_IVL) == 200
        assert sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 600
        assert sock.getsockopt(zmq.CONNECT_TIMEOUT) == 600
    with ZmqMessageSubscriber(CODEC, wirebus_address) as subscriber:
        assert subscriber._socket.getsockopt(zmq.HEARTBEAT_IVL) == 0  # off by default


async def test_a_frozen_publisher_is_dropped_by_heartbeat_and_found_again(
    peers: list[Peer],
) -> None:
    """A publisher process that stops answering (SIGSTOP) looks like a dead link: its TCP
    connection stays up, only ZMTP heartbeats notice. After SIGCONT the subscriber is back."""
    publisher = _peer(peers, "pace", "tcp://127.0.0.1:*")
    await publisher.wait_for(lambda s: "address" in s, timeout=15)
    async with Collector(CODEC, publisher.state["address"], heartbeat=100) as subscriber:
        try:
            await subscriber.wait_until(lambda: len(subscriber.items) >= 100)
            publisher.proc.send_signal(signal.SIGSTOP)
            # the heartbeat times out after 300 ms; the subscriber's watch counts it
            await subscriber.wait_until(lambda: subscriber.stats.disconnects > 0, timeout=10)
            frozen_at = subscriber.items[-1].seq
        finally:
            publisher.proc.send_signal(signal.SIGCONT)
        await subscriber.wait_until(lambda: subscriber.items[-1].seq >= frozen_at + 200)
        publisher.send("stop")
        final = (await publisher.finish())["final"]
        await subscriber.wait_until(lambda: subscriber.items[-1].seq == final)
    seqs = [item.seq for item in subscriber.items]
    assert seqs == sorted(seqs)
    assert subscriber.stats.received + subscriber.stats.dropped == final + 1


# -- the peers -------------------------------------------------------------------------------


async def _publish(address: str, n: int, source: int) -> None:
    with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
        await publisher.wait_for_subscribers(1, timeout=20)
        for seq in range(n):
            publisher.publish(Tick(source, seq))


async def _pace(address: str) -> None:
    """Bind, wait for a subscriber, publish 10 items per 2 ms until told to stop."""
    stop = stdin_says_stop()
    with ZmqMessagePublisher(CODEC, address, heartbeat=100) as publisher:
        print(json.dumps({"address": publisher.address}), flush=True)
        await publisher.wait_for_subscribers(1, timeout=20)
        seq = 0
        while not stop.is_set():
            for _ in range(10):
                publisher.publish(Tick(0, seq))
                seq += 1
            await asyncio.sleep(0.002)  # pacing the load, not synchronisation
        await publisher.flush(timeout=10)
        print(json.dumps({"final": seq - 1}), flush=True)


async def _subscribe(address: str, mode: str, until: int) -> None:
    stop = stdin_says_stop()

    class Checker(ZmqMessageSubscriber[Tick]):
        def __init__(self) -> None:
            super().__init__(CODEC, address, connect=mode == "connect")
            self.first: dict[str, int] = {}
            self.last: dict[str, int] = {}
            self.ordered = True
            self.done = asyncio.Event()

        async def process(self, items: list[Tick]) -> None:
            for item in items:
                key = str(item.source)
                self.first.setdefault(key, item.seq)
                self.ordered = self.ordered and item.seq > self.last.get(key, -1)
                self.last[key] = item.seq
            if until and self.stats.received >= until:
                self.done.set()

    def report(subscriber: Checker) -> None:
        stats = subscriber.stats
        fields = {"received": stats.received, "dropped": stats.dropped}
        fields.update(first=subscriber.first, last=subscriber.last, ordered=subscriber.ordered)
        print(json.dumps(fields), flush=True)

    async with Checker() as subscriber:
        print(json.dumps({"address": subscriber.address}), flush=True)
        while not stop.is_set() and not subscriber.done.is_set():
            report(subscriber)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(subscriber.done.wait(), 0.02)  # the reporting period
        report(subscriber)


if __name__ == "__main__":
    role, peer_address, *rest = sys.argv[1:]
    if role == "publish":
        asyncio.run(_publish(peer_address, int(rest[0]), int(rest[1])))
    elif role == "pace":
        asyncio.run(_pace(peer_address))
    else:
        asyncio.run(_subscribe(peer_address, rest[0], int(rest[1])))
