"""Tests of the harness's own parts with wirebus's pytest plugin (its fixtures come with
wirebus; nothing to import but the types)."""

from __future__ import annotations

import sys
from pathlib import Path

import msgspec
import pytest
from messages import CODEC, Done, HarnessMessage, Request, Response

from wirebus import ServiceLauncher, ServiceSpec, ZmqMessagePublisher
from wirebus.testing import SubscriberFactory

HERE = Path(__file__).resolve().parent


@pytest.mark.asyncio
async def test_one_socket_carries_every_type(
    wirebus_address: str, wirebus_subscriber: SubscriberFactory
) -> None:
    with ZmqMessagePublisher(CODEC, wirebus_address) as publisher:
        subscriber = await wirebus_subscriber(CODEC, wirebus_address)
        await publisher.wait_for_subscribers(1, timeout=10)  # one topic (all): one subscription
        sent: list[HarnessMessage] = [Request("r1", "hi", 4), Response("r1", "hello", 2), Done(1)]
        for message in sent:
            publisher.publish(message)
        assert await subscriber.wait_for(3) == sent  # each decoded as its own type


@pytest.mark.asyncio
async def test_sink_records_every_response(
    wirebus_address: str, wirebus_launcher: ServiceLauncher, tmp_path: Path
) -> None:
    with ZmqMessagePublisher(CODEC, wirebus_address) as publisher:
        ready = await wirebus_launcher.start([
            ServiceSpec("sink", [
                sys.executable, str(HERE / "sink.py"),
                "--address", wirebus_address, "--out", str(tmp_path / "responses.jsonl"),
            ]),
        ])  # fmt: skip
        await publisher.wait_for_subscribers(2, timeout=10)  # "response" and "done"
        responses = [Response(f"r{i}", "text", i) for i in range(50)]
        for response in responses:
            publisher.publish(Request(response.uuid, "prompt", 8))  # not for the sink
            publisher.publish(response)
        publisher.publish(Done(len(responses)))
        await publisher.flush(timeout=10)
        assert await wirebus_launcher.stop() == {"sink": 0}
    assert read_responses(ready["sink"].info["path"]) == responses


def read_responses(path: str) -> list[Response]:
    with open(path, "rb") as f:
        return [msgspec.json.decode(line, type=Response) for line in f]
