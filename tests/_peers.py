"""Peer processes for the transport tests: ``python tests/_peers.py ROLE ADDRESS ...``.

publish ADDRESS N bind|connect
    wait for one subscriber, publish N EventRecords (timestamp_ns = 0..N-1, sample topic) as
    fast as possible, then close (which delivers what is pending).
"""

from __future__ import annotations

import asyncio
import sys

from wirebus import EventRecord, EventRecordCodec, SampleEventType
from wirebus.transport import ZmqMessagePublisher


def _records(n: int) -> list[EventRecord]:
    return [
        EventRecord(SampleEventType.ISSUED, timestamp_ns=i, sample_uuid=f"{i:016x}")
        for i in range(n)
    ]


async def _publish(address: str, n: int, bind: bool) -> None:
    with ZmqMessagePublisher(EventRecordCodec(), address, bind=bind) as publisher:
        await publisher.wait_for_subscribers(1, timeout=20)
        for record in _records(n):
            publisher.publish(record)


def main(argv: list[str]) -> None:
    role, address, n, mode = argv[0], argv[1], int(argv[2]), argv[3]
    assert role == "publish", role
    asyncio.run(_publish(address, n, bind=mode == "bind"))


if __name__ == "__main__":
    main(sys.argv[1:])
