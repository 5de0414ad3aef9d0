"""Peer processes for the replay tests: ``python tests/_replay_peers.py ROLE ARGS...``.

publish ADDRESS REPLAY SNDHWM
    a publisher (binds ADDRESS) with ``replay=REPLAY`` and ``sndhwm=SNDHWM`` that sends one
    item per message. It prints ``{"replay": endpoint}``; once a subscriber is there, each
    line ``N`` on stdin publishes N more EventRecords (timestamp_ns counting on from 0) and
    prints ``{"published": total}`` once they are handed to ZMQ; ``stop`` closes it.
stream ADDRESS NAME
    a publisher that connects to a bound subscriber (fan-in) with replay on and publishes
    records (sample_uuid NAME, timestamp_ns 0, 1, ...) in small bursts until ``stop``, then
    prints ``{"published": total}``.
subscribe ADDRESS
    a subscriber that prints ``{"received": n}`` after each batch (for a test to kill it).
vanish ADDRESS REPLAY_ADDRESS
    a raw pyzmq publisher (connecting to a bound subscriber) that announces a replay endpoint
    it serves on a raw ROUTER: it sends items 0 and 5 of one topic (sample_uuid "vanish"), then
    SIGKILLs itself on the first replay request it gets.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import zmq

from _peers import build_frame, stdin_says_stop
from wirebus import EventRecord, EventRecordCodec, SampleEventType, make_topic
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber


def _say(**state: object) -> None:
    print(json.dumps(state), flush=True)


def _record(seq: int, name: str = "") -> EventRecord:
    return EventRecord(SampleEventType.ISSUED, timestamp_ns=seq, sample_uuid=name)


async def _publish(address: str, replay: int, sndhwm: int) -> None:
    publisher = ZmqMessagePublisher(
        EventRecordCodec(), address, replay=replay, sndhwm=sndhwm, max_batch_bytes=1
    )
    total = 0
    _say(replay=publisher.replay_address)
    with publisher:
        await publisher.wait_for_subscribers(1, timeout=20)
        while True:
            command = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if command in ("stop", ""):
                break
            for _ in range(int(command)):
                publisher.publish(_record(total))
                total += 1
            await publisher.flush(timeout=20)
            _say(published=total)


async def _stream(address: str, name: str) -> None:
    stop = stdin_says_stop()
    total = 0
    with ZmqMessagePublisher(EventRecordCodec(), address, bind=False, replay=10_000) as publisher:
        await publisher.wait_for_subscribers(1, timeout=20)
        while not stop.is_set():
            for _ in range(20):
                publisher.publish(_record(total, name))
                total += 1
            await asyncio.sleep(0.002)
        await publisher.flush(timeout=20)
    _say(published=total)


async def _subscribe(address: str) -> None:
    class Reporting(ZmqMessageSubscriber[EventRecord]):
        received = 0

        async def process(self, items: list[EventRecord]) -> None:
            self.received += len(items)
            _say(received=self.received)

    async with Reporting(EventRecordCodec(), address):
        await asyncio.Event().wait()  # until killed


def _vanish(address: str, replay_address: str) -> None:
    context = zmq.Context()
    xpub, router = context.socket(zmq.XPUB), context.socket(zmq.ROUTER)
    xpub.connect(address)
    router.bind(replay_address)
    xpub.recv()  # the subscription: nothing sent before it is lost to a slow joiner
    topic, endpoint = make_topic("sample"), replay_address.encode()
    for seq in (0, 5):
        payload = EventRecordCodec().encode(_record(seq, "vanish"))[1]
        xpub.send(build_frame(topic, 7, seq, [payload], run=True, replay=endpoint))
    request = router.recv_multipart()
    _say(asked=len(request))
    time.sleep(0.05)  # the line above reaches the test before the process is gone
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    role, address = argv[0], argv[1]
    if role == "publish":
        asyncio.run(_publish(address, int(argv[2]), int(argv[3])))
    elif role == "stream":
        asyncio.run(_stream(address, argv[2]))
    elif role == "subscribe":
        asyncio.run(_subscribe(address))
    else:
        assert role == "vanish", role
        _vanish(address, argv[2])


if __name__ == "__main__":
    main(sys.argv[1:])
