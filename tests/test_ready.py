from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import threading
import time

import msgspec
import pytest
import zmq

from wirebus.errors import ReadyTimeoutError, WirebusError
from wirebus.ready import (
    READY_ADDRESS_ENV,
    READY_TOKEN_ENV,
    SERVICE_NAME_ENV,
    ReadyCheckReceiver,
    ReadySignal,
    notify_ready,
    send_ready_signal,
)


def _send_raw(address: str, frame: bytes) -> None:
    """Send one frame the way a non-wirebus service would: a plain PUSH, flushed before close."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sock.connect(address)
        sock.send(frame)
        sock.close(linger=5000)
    finally:
        context.term()


async def test_wait_by_names_returns_each_signal_with_pid_and_info() -> None:
    with ReadyCheckReceiver(token="launch-1") as receiver:
        send_ready_signal(receiver.address, "logger", {"address": "ipc:///x"}, token="launch-1")
        send_ready_signal(receiver.address, "metrics", {"store": "/dev/shm/m"}, token="launch-1")
        ready = await receiver.wait(["logger", "metrics"], timeout=5)
    assert set(ready) == {"logger", "metrics"}
    assert ready["logger"].pid == os.getpid()
    assert ready["logger"].info == {"address": "ipc:///x"}
    assert ready["metrics"].info == {"store": "/dev/shm/m"}
    assert ready["metrics"].token == "launch-1"


async def test_wait_by_count_counts_distinct_identities() -> None:
    async with ReadyCheckReceiver() as receiver:
        for identity in ("a", "a", "b", "c"):
            send_ready_signal(receiver.address, identity)
        ready = await receiver.wait(3, timeout=5)
        assert set(ready) == {"a", "b", "c"}
        assert await receiver.wait(0, timeout=1) == {}


def test_fresh_ipc_address_and_its_private_directory_are_removed_on_close() -> None:
    receiver = ReadyCheckReceiver()
    assert receiver.address.startswith("ipc://")
    directory = os.path.dirname(receiver.address.removeprefix("ipc://"))
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700)
    receiver.close()
    receiver.close()
    assert receiver.closed
    assert not os.path.exists(directory)


async def test_a_closed_receiver_refuses_to_wait() -> None:
    receiver = ReadyCheckReceiver()
    receiver.close()
    with pytest.raises(RuntimeError, match="closed"):
        await receiver.wait(["a"], timeout=1)


async def test_tcp_receiver_reports_the_port_it_bound() -> None:
    with ReadyCheckReceiver("tcp://127.0.0.1:*") as receiver:
        assert receiver.address.startswith("tcp://127.0.0.1:")
        assert not receiver.address.endswith(":*")
        send_ready_signal(receiver.address, "svc", {"n": 1})
        assert (await receiver.wait(["svc"], timeout=5))["svc"].info == {"n": 1}


async def test_stale_token_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with ReadyCheckReceiver(token="run-2") as receiver:
        send_ready_signal(receiver.address, "svc", {"run": 1}, token="run-1")
        send_ready_signal(receiver.address, "svc", {"run": 2}, token="run-2")
        with caplog.at_level(logging.WARNING, logger="wirebus.ready"):
            ready = await receiver.wait(["svc"], timeout=5)
    assert ready["svc"].info == {"run": 2}
    assert any("'run-1'" in r.getMessage() and "stale" in r.getMessage() for r in caplog.records)


async def test_a_stale_signal_alone_never_counts() -> None:
    with ReadyCheckReceiver(token="run-2") as receiver:
        send_ready_signal(receiver.address, "svc", token="run-1")
        with pytest.raises(ReadyTimeoutError) as info:
            await receiver.wait(["svc"], timeout=0.3)
    assert info.value.missing == ["svc"]


async def test_unknown_identity_is_ignored_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with ReadyCheckReceiver() as receiver:
        send_ready_signal(receiver.address, "intruder")
        send_ready_signal(receiver.address, "svc")
        with caplog.at_level(logging.WARNING, logger="wirebus.ready"):
            ready = await receiver.wait(["svc"], timeout=5)
    assert list(ready) == ["svc"]
    assert any("'intruder'" in r.getMessage() for r in caplog.records)


async def test_undecodable_messages_are_ignored_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with ReadyCheckReceiver() as receiver:
        _send_raw(receiver.address, b"\xc1 not msgpack")
        _send_raw(receiver.address, msgspec.msgpack.encode({"identity": "svc"}))
        send_ready_signal(receiver.address, "svc")
        with caplog.at_level(logging.WARNING, logger="wirebus.ready"):
            ready = await receiver.wait(["svc"], timeout=5)
    assert list(ready) == ["svc"]
    assert sum("malformed" in r.getMessage() for r in caplog.records) == 2


async def test_a_deeply_nested_signal_is_ignored_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    depth = 200_000
    frame = (
        b"\x83"  # a map of three: identity, pid, info
        + msgspec.msgpack.encode("identity")
        + msgspec.msgpack.encode("svc")
        + msgspec.msgpack.encode("pid")
        + msgspec.msgpack.encode(1)
        + msgspec.msgpack.encode("info")
        + b"\x81\xa1a" * depth
        + b"\xc0"
    )
    with ReadyCheckReceiver() as receiver:
        _send_raw(receiver.address, frame)
        send_ready_signal(receiver.address, "svc", {"depth": 1})
        with caplog.at_level(logging.WARNING, logger="wirebus.ready"):
            ready = await receiver.wait(["svc"], timeout=5)
    assert ready["svc"].info == {"depth": 1}
    assert any("malformed" in r.getMessage() for r in caplog.records)


async def test_wire_format_is_a_msgpack_map_in_one_frame() -> None:
    with ReadyCheckReceiver(token="t") as receiver:
        frame = msgspec.msgpack.encode(
            {"identity": "native", "pid": 42, "info": {"port": 7}, "token": "t", "extra": 1}
        )
        _send_raw(receiver.address, frame)
        ready = await receiver.wait(["native"], timeout=5)
    assert ready["native"] == ReadySignal("native", 42, {"port": 7}, "t")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(ready["native"])) == {
        "identity": "native",
        "pid": 42,
        "info": {"port": 7},
        "token": "t",
    }


async def test_timeout_names_who_is_missing() -> None:
    with ReadyCheckReceiver() as receiver:
        send_ready_signal(receiver.address, "a")
        started = time.monotonic()
        with pytest.raises(ReadyTimeoutError) as info:
            await receiver.wait(["a", "b", "c"], timeout=0.3)
        elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, WirebusError)
    assert info.value.missing == ["b", "c"]
    assert "['b', 'c']" in str(info.value)
    assert 0.3 <= elapsed < 2


async def test_count_timeout_says_how_many_arrived() -> None:
    with ReadyCheckReceiver() as receiver:
        send_ready_signal(receiver.address, "a")
        with pytest.raises(ReadyTimeoutError, match=r"1 of 2 .*\['a'\]"):
            await receiver.wait(2, timeout=0.2)


async def test_burst_is_drained_and_a_later_signal_still_wakes_the_waiter() -> None:
    names = [f"svc{i}" for i in range(20)]
    with ReadyCheckReceiver() as receiver:
        for name in names:
            send_ready_signal(receiver.address, name)
        assert set(await receiver.wait(names, timeout=5)) == set(names)
        sender = threading.Thread(target=send_ready_signal, args=(receiver.address, "late"))
        waiting = asyncio.ensure_future(receiver.wait(["late"], timeout=5))
        sender.start()
        try:
            ready = await waiting
        finally:
            sender.join()
    assert list(ready) == ["late"]


async def test_sender_waits_for_a_receiver_that_binds_later(wirebus_address: str) -> None:
    errors: list[BaseException] = []

    def send() -> None:
        try:
            send_ready_signal(wirebus_address, "early", timeout=10)
        except BaseException as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        with ReadyCheckReceiver(wirebus_address) as receiver:
            ready = await receiver.wait(["early"], timeout=10)
    finally:
        sender.join()
    assert errors == []
    assert list(ready) == ["early"]


def test_send_to_nobody_fails_within_its_timeout(wirebus_address: str) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=wirebus_address):
        send_ready_signal(wirebus_address, "svc", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5


def _run_child(code: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


async def test_notify_ready_from_a_child_reaches_the_parent_and_the_child_exits_at_once() -> None:
    with ReadyCheckReceiver(token="tok") as receiver:
        env = {READY_ADDRESS_ENV: receiver.address, SERVICE_NAME_ENV: "kid", READY_TOKEN_ENV: "tok"}
        code = "from wirebus.ready import notify_ready; notify_ready({'bound': 'tcp://x:1'})"
        child = _run_child(code, env)
        try:
            ready = await receiver.wait(["kid"], timeout=20)
            signalled = time.monotonic()
            _, stderr = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert ready["kid"].pid == child.pid
    assert ready["kid"].info == {"bound": "tcp://x:1"}
    assert child.returncode == 0, stderr.decode()
    assert time.monotonic() - signalled < 2


def test_a_child_that_cannot_reach_its_parent_fails_fast_instead_of_lingering(
    wirebus_address: str,
) -> None:
    env = {READY_ADDRESS_ENV: wirebus_address, SERVICE_NAME_ENV: "kid"}
    code = "from wirebus.ready import notify_ready; notify_ready(timeout=0.5)"
    started = time.monotonic()
    child = _run_child(code, env)
    try:
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode != 0
    assert "TimeoutError" in stderr.decode()
    assert wirebus_address in stderr.decode()
    assert time.monotonic() - started < 4


def test_notify_ready_outside_a_launcher_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(READY_ADDRESS_ENV, raising=False)
    monkeypatch.delenv(SERVICE_NAME_ENV, raising=False)
    started = time.monotonic()
    notify_ready({"a": 1}, timeout=5)
    assert time.monotonic() - started < 0.5


async def test_waiting_does_not_block_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        with ReadyCheckReceiver() as receiver, pytest.raises(ReadyTimeoutError):
            await receiver.wait(["never"], timeout=0.5)
    finally:
        task.cancel()
    assert ticks >= 15


async def test_closing_wakes_a_pending_wait() -> None:
    receiver = ReadyCheckReceiver()
    asyncio.get_running_loop().call_later(0.05, receiver.close)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="closed"):
        await receiver.wait(["a"], timeout=10)
    assert time.monotonic() - started < 5


async def test_only_one_receive_at_a_time() -> None:
    with ReadyCheckReceiver() as receiver:
        first = asyncio.ensure_future(receiver.receive(5))
        await asyncio.sleep(0)  # one loop turn: the task runs until it waits on the socket
        with pytest.raises(RuntimeError, match="already waiting"):
            await receiver.receive(1)
        send_ready_signal(receiver.address, "a")
        assert (await first).identity == "a"


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan, math.inf])
def test_send_rejects_a_bad_timeout(wirebus_address: str, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        send_ready_signal(wirebus_address, "svc", timeout=timeout)


@pytest.mark.parametrize(
    ("identity", "info", "error", "match"),
    [
        ("", None, ValueError, "identity"),
        ("svc", {1: "x"}, TypeError, "info"),
        ("svc", {"when": object()}, TypeError, "info"),
        ("svc", ["not", "a", "map"], TypeError, "info"),
    ],
)
def test_send_rejects_bad_identity_and_info(
    wirebus_address: str, identity: str, info: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        send_ready_signal(wirebus_address, identity, info, timeout=1)  # type: ignore[arg-type]


def test_send_rejects_a_bad_address() -> None:
    with pytest.raises(ValueError, match="nowhere"):
        send_ready_signal("nowhere", "svc")


async def test_wait_rejects_bad_arguments() -> None:
    with ReadyCheckReceiver() as receiver:
        with pytest.raises(ValueError, match="timeout"):
            await receiver.wait(["a"], timeout=0)
        with pytest.raises(TypeError, match="'ab'"):
            await receiver.wait("ab", timeout=1)
        with pytest.raises(ValueError, match="-1"):
            await receiver.wait(-1, timeout=1)
        with pytest.raises(ValueError, match="''"):
            await receiver.wait(["a", ""], timeout=1)


def test_receiver_refuses_every_interface_and_an_address_in_use() -> None:
    with pytest.raises(ValueError, match=r"0\.0\.0\.0"):
        ReadyCheckReceiver("tcp://0.0.0.0:5555")
    with ReadyCheckReceiver() as first, pytest.raises(OSError, match=first.address):
        ReadyCheckReceiver(first.address)
