"""The harness's own service: writes every Response to a JSON lines file.

Started by the harness with ServiceLauncher; run by hand it works too:
``python sink.py --address tcp://127.0.0.1:5600 --out responses.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import BinaryIO

import msgspec
from messages import CODEC, Done, HarnessMessage, Response

from wirebus import ServiceContext, ZmqMessageSubscriber, run_service


class ResponseSink(ZmqMessageSubscriber[HarnessMessage]):
    """Subscribes to responses and to the run's end; requests never reach it."""

    def __init__(self, address: str, out: BinaryIO) -> None:
        super().__init__(CODEC, address, topics=["response", "done"])
        self.out = out
        self.done = asyncio.Event()
        self._json = msgspec.json.Encoder()

    async def process(self, items: list[HarnessMessage]) -> None:
        for item in items:
            if isinstance(item, Response):
                self.out.write(self._json.encode(item) + b"\n")
            elif isinstance(item, Done):
                self.done.set()


async def main(service: ServiceContext, address: str, out: BinaryIO) -> None:
    async with ResponseSink(address, out) as sink:
        service.ready({"path": out.name})  # now the launcher's start() returns
        await service.stopped()  # SIGTERM, from launcher.stop()
        try:  # in order, exactly once: with Done, every response before it has arrived
            await asyncio.wait_for(sink.done.wait(), timeout=5)
        except asyncio.TimeoutError:
            print("stopped before Done: the last responses may be missing", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True, help="the harness's message publisher")
    parser.add_argument("--out", required=True, help="the JSON lines file to write")
    args = parser.parse_args()
    with open(os.path.abspath(args.out), "wb") as out:
        run_service(lambda service: main(service, args.address, out))
