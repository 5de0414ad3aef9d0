"""Checked by ``mypy --strict`` in ``make test`` (never executed): what mypy infers.

``assert_type`` fails the type check when the inferred type differs; the ``type: ignore``
lines must stay errors (``warn_unused_ignores`` is part of ``--strict``).
"""

from __future__ import annotations

import msgspec
from typing_extensions import assert_type

from wirebus import (
    EventRecord,
    EventRecordCodec,
    MsgspecCodec,
    ZmqMessagePublisher,
    ZmqMessageSubscriber,
)


class Tick(msgspec.Struct):
    seq: int


async def inference() -> None:
    codec = MsgspecCodec(Tick, topic="tick")
    assert_type(codec, MsgspecCodec[Tick])
    publisher = ZmqMessagePublisher(codec, "ipc:///tmp/x")
    assert_type(publisher, ZmqMessagePublisher[Tick])
    subscriber = ZmqMessageSubscriber(MsgspecCodec(Tick, topic="tick"), "ipc:///tmp/x")
    assert_type(subscriber, ZmqMessageSubscriber[Tick])
    assert_type(await subscriber.receive(), Tick)
    async for tick in subscriber:
        assert_type(tick, Tick)
    records = ZmqMessageSubscriber(EventRecordCodec(), "ipc:///tmp/x")
    assert_type(await records.receive(), EventRecord)
    with ZmqMessagePublisher(EventRecordCodec(), "ipc:///tmp/y") as events:
        assert_type(events, ZmqMessagePublisher[EventRecord])
    async with ZmqMessageSubscriber(codec, "ipc:///tmp/x") as started:
        assert_type(started, ZmqMessageSubscriber[Tick])


class Quote(msgspec.Struct, tag="quote"):
    bid: float


class Trade(msgspec.Struct, tag="trade"):
    price: float


async def a_union_on_one_socket() -> None:
    """Two message types on one socket: the codec's type is annotated, and what flows from it
    keeps the union."""
    codec: MsgspecCodec[Quote | Trade] = MsgspecCodec(Quote | Trade, topic="market")
    publisher = ZmqMessagePublisher(codec, "ipc:///tmp/x")
    publisher.publish_many([Quote(1.0), Trade(2.0)])
    subscriber = ZmqMessageSubscriber(codec, "ipc:///tmp/x")
    assert_type(await subscriber.receive(), Quote | Trade)
    assert_type(subscriber.receive_blocking(timeout=1), Quote | Trade)


def mismatches() -> None:
    publisher = ZmqMessagePublisher(MsgspecCodec(Tick, topic="tick"), "ipc:///tmp/x")
    publisher.publish(EventRecord.__new__(EventRecord))  # type: ignore[arg-type]
    wrong: ZmqMessagePublisher[int] = publisher  # type: ignore[assignment]
    del wrong
