"""Checked by ``mypy --strict`` in ``make test`` (never executed): the pytest plugin's fixtures
keep the item type of the codec they are given."""

from __future__ import annotations

import msgspec
from typing_extensions import assert_type

from wirebus import EventRecord, EventRecordCodec, MsgspecCodec
from wirebus.testing import CollectingSubscriber, SubscriberFactory


class Tick(msgspec.Struct):
    seq: int


async def test_typed(wirebus_address: str, wirebus_subscriber: SubscriberFactory) -> None:
    ticks = await wirebus_subscriber(MsgspecCodec(Tick, topic="tick"), wirebus_address)
    assert_type(ticks, CollectingSubscriber[Tick])
    assert_type(await ticks.wait_for(3), list[Tick])
    assert_type(ticks.items, list[Tick])
    records = await wirebus_subscriber(EventRecordCodec(), wirebus_address, timeout=2.0)
    assert_type(await records.receive(), EventRecord)
    wrong: CollectingSubscriber[Tick] = records  # type: ignore[assignment]
    del wrong
