"""The pytest plugin's fixtures, used by a test file of a pretend user project."""

from __future__ import annotations

import pytest

USER_TESTS = """
import sys

import msgspec

from wirebus import MsgspecCodec, ServiceSpec, ZmqMessagePublisher


class Tick(msgspec.Struct):
    seq: int


async def test_subscriber_collects(wirebus_address, wirebus_subscriber):
    codec = MsgspecCodec(Tick, topic="tick")
    with ZmqMessagePublisher(codec, wirebus_address) as publisher:
        subscriber = await wirebus_subscriber(codec, wirebus_address)
        await publisher.wait_for_subscribers(timeout=10)
        for seq in range(3):
            publisher.publish(Tick(seq))
        assert await subscriber.wait_for(3) == [Tick(0), Tick(1), Tick(2)]


def test_kvstore(wirebus_kvstore):
    wirebus_kvstore.counter("hits").inc(2)
    assert wirebus_kvstore.counter("hits").value == 2
    STORES.append(wirebus_kvstore.path)


async def test_launcher(wirebus_launcher):
    code = "from wirebus import notify_ready; import time; notify_ready({'x': 1}); time.sleep(60)"
    ready = await wirebus_launcher.start([ServiceSpec("svc", [sys.executable, "-c", code])])
    assert ready["svc"].info == {"x": 1}
    PIDS.extend(wirebus_launcher.pids.values())


STORES = []
PIDS = []


def test_fixtures_cleaned_up():
    import os

    assert STORES and not os.path.exists(STORES[0])
    assert PIDS and not os.path.exists(f"/proc/{PIDS[0]}")
"""


def test_fixtures_work_in_a_user_project(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
    )
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-q")
    result.assert_outcomes(passed=4)
