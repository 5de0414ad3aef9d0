"""The pytest plugin's fixtures, used by the test files of a pretend user project (pytester),
under pytest-asyncio's strict mode (its default) and auto mode."""

from __future__ import annotations

from pathlib import Path

import pytest

USER_TESTS = """
import asyncio
import os
import sys

import msgspec
import pytest

from wirebus import MsgspecCodec, ServiceSpec, ZmqMessagePublisher


class Tick(msgspec.Struct):
    seq: int


{mark}async def test_subscriber_collects(wirebus_address, wirebus_subscriber):
    codec = MsgspecCodec(Tick, topic="tick")
    with ZmqMessagePublisher(codec, wirebus_address) as publisher:
        subscriber = await wirebus_subscriber(codec, wirebus_address)
        await publisher.wait_for_subscribers(timeout=10)
        for seq in range(3):
            publisher.publish(Tick(seq))
        assert await subscriber.wait_for(3) == [Tick(0), Tick(1), Tick(2)]
    SUBSCRIBERS.append(subscriber)


def test_kvstore(wirebus_kvstore):
    wirebus_kvstore.counter("hits").inc(2)
    assert wirebus_kvstore.counter("hits").value == 2
    STORES.append(wirebus_kvstore.path)


{mark}async def test_launcher(wirebus_launcher):
    code = "from wirebus import notify_ready; import time; notify_ready({{'x': 1}}); time.sleep(60)"
    ready = await wirebus_launcher.start([ServiceSpec("svc", [sys.executable, "-c", code])])
    assert ready["svc"].info == {{"x": 1}}
    PIDS.extend(wirebus_launcher.pids.values())


SUBSCRIBERS = []
STORES = []
PIDS = []


def test_fixtures_cleaned_up():
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(SUBSCRIBERS[0].start())
    assert STORES and not os.path.exists(STORES[0])
    assert PIDS and not os.path.exists(f"/proc/{{PIDS[0]}}")
"""

MODES = {
    # strict, pytest-asyncio's default: async tests carry the marker, the plugin's fixtures
    # must be pytest-asyncio fixtures
    "strict": "@pytest.mark.asyncio\n",
    "auto": "",
}


def _user_project(pytester: pytest.Pytester, mode: str, ini: str = "") -> None:
    pytester.makeini(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
        f"filterwarnings = error\n{ini}"
    )


@pytest.mark.parametrize("mode", MODES)
def test_fixtures_work_in_a_user_project(pytester: pytest.Pytester, mode: str) -> None:
    _user_project(pytester, mode)
    pytester.makepyfile(test_user=USER_TESTS.format(mark=MODES[mode]))
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=4)


SETTINGS_TESTS = """
import sys
import time

import pytest

from wirebus import EventRecordCodec, ServiceSpec

SLEEPER = "import time; time.sleep(60)"


{mark}async def test_wait_timeout_from_ini(wirebus_address, wirebus_subscriber):
    subscriber = await wirebus_subscriber(EventRecordCodec(), wirebus_address)
    with pytest.raises(TimeoutError, match="within 0.25 s"):
        await subscriber.wait_for(1)


{mark}@pytest.mark.wirebus(timeout=0.5)
async def test_wait_timeout_from_marker(wirebus_address, wirebus_subscriber):
    subscriber = await wirebus_subscriber(EventRecordCodec(), wirebus_address)
    with pytest.raises(TimeoutError, match="within 0.5 s"):
        await subscriber.wait_for(1)


{mark}@pytest.mark.wirebus(ready_timeout=0.5)
async def test_ready_timeout_and_log_dir(wirebus_launcher):
    code = "import sys; print('hello from svc', flush=True); import time; time.sleep(60)"
    with pytest.raises(TimeoutError, match="not ready within 0.5 s"):
        await wirebus_launcher.start([ServiceSpec("svc", [sys.executable, "-c", code])])
"""


@pytest.mark.parametrize("mode", MODES)
def test_timeouts_and_log_dir_can_be_set(
    pytester: pytest.Pytester, mode: str, tmp_path: Path
) -> None:
    logs = tmp_path / "service-logs"
    _user_project(pytester, mode, f"wirebus_timeout = 0.25\nwirebus_log_dir = {logs}\n")
    pytester.makepyfile(test_settings=SETTINGS_TESTS.format(mark=MODES[mode]))
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=3)
    kept = logs / "test_settings.py__test_ready_timeout_and_log_dir" / "svc.log"
    assert "hello from svc" in kept.read_text()  # kept after the test, one directory per test


def test_log_dir_from_the_command_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    _user_project(pytester, "strict")
    pytester.makepyfile(test_settings=SETTINGS_TESTS.format(mark=MODES["strict"]))
    logs = tmp_path / "cli-logs"
    result = pytester.runpytest_subprocess(
        "-q", "-o", f"wirebus_log_dir={logs}", "-k", "log_dir", "-o", "wirebus_timeout=1"
    )
    result.assert_outcomes(passed=1)
    assert (logs / "test_settings.py__test_ready_timeout_and_log_dir" / "svc.log").is_file()


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("wirebus_timeout = soon", "wirebus_timeout must be a number of seconds, got 'soon'"),
        ("wirebus_ready_timeout = -1", "wirebus_ready_timeout must be a positive"),
    ],
)
def test_a_bad_setting_is_a_clear_error(
    pytester: pytest.Pytester, setting: str, message: str
) -> None:
    _user_project(pytester, "strict", setting + "\n")
    pytester.makepyfile(test_settings=SETTINGS_TESTS.format(mark=MODES["strict"]))
    result = pytester.runpytest_subprocess("-q")
    assert result.ret != 0
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_sync_fixtures_work_without_pytest_asyncio(pytester: pytest.Pytester) -> None:
    """The plugin loads in every pytest run of a project that has wirebus installed."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    # shadow pytest-asyncio: its plugin blocked, its module unimportable
    pytester.mkpydir("pytest_asyncio").joinpath("__init__.py").write_text(
        "raise ImportError('pytest-asyncio is not installed here')\n"
    )
    pytester.makepyfile(
        test_sync="""
        def test_sync(wirebus_address, wirebus_kvstore):
            assert wirebus_address.startswith("ipc://")
            wirebus_kvstore.gauge("g").set(1)
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:asyncio")
    result.assert_outcomes(passed=1)
