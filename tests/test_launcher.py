from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _support import wait_until_async
from wirebus import _paths
from wirebus.errors import ReadyTimeoutError, ServiceStartupError
from wirebus.launcher import ServiceLauncher, ServiceSpec
from wirebus.service import ServiceContext

PY = sys.executable

SERVICE = '''
import asyncio, os, signal, subprocess, sys, time
from wirebus.service import run_service
from wirebus.ready import notify_ready, send_ready_signal

MODE = sys.argv[1]
GRANDCHILD = """
import os, signal, sys
if "setsid" in sys.argv[1]:
    os.setsid()
if "ignore" in sys.argv[1]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("up", flush=True)
while True:
    signal.pause()
"""

if MODE == "crash":
    print(f"exit-time {time.monotonic()!r}", flush=True)
    print("boom on stderr", file=sys.stderr, flush=True)
    sys.exit(3)
if MODE == "killself":
    os.kill(os.getpid(), signal.SIGKILL)
if MODE == "ignore-term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    notify_ready()
    while True:
        signal.pause()


async def main(service):
    if MODE == "raise":
        raise RuntimeError("bad config xyz")
    if MODE == "chatty":
        sys.stdout.write("o" * (1 << 20))
        sys.stderr.write("e" * (1 << 20))
    if MODE in ("never", "stale", "intruder"):
        print("waiting", flush=True)
        if MODE == "stale":
            send_ready_signal(service.ready_address, service.name, token="stale-token")
        if MODE == "intruder":
            send_ready_signal(service.ready_address, "intruder", token=service.token)
        await service.stopped()
        return
    if MODE == "spoof":
        evil = {"address": "tcp://evil:1"}
        send_ready_signal(service.ready_address, "b", evil, token=service.token)
    if MODE == "notify":
        notify_ready({"via": "notify_ready"})
        await service.stopped()
        return
    info = {
        "pid": os.getpid(),
        "name": service.name,
        "stdin": os.readlink("/proc/self/fd/0"),
        "cwd": os.getcwd(),
        "foo": os.environ.get("FOO"),
        "wirebus_env": sorted(
            k for k in os.environ if k.startswith("WIREBUS_") and k != "WIREBUS_RUNTIME_DIR"
        ),
    }
    if MODE.startswith("grandchild"):
        how = MODE.removeprefix("grandchild-")
        kid = subprocess.Popen([sys.executable, "-c", GRANDCHILD, how], stdout=subprocess.PIPE)
        assert kid.stdout is not None
        assert kid.stdout.readline() == b"up\\n"
        info["grandchild"] = kid.pid
    service.ready(info)
    print(f"started {service.name}", flush=True)
    await service.stopped()
    print("stop requested", flush=True)
    if MODE == "stubborn":
        await asyncio.Event().wait()


run_service(main)
'''

PARENT = """
import asyncio, json, sys
from wirebus.launcher import ServiceLauncher, ServiceSpec

async def main():
    launcher = ServiceLauncher(ready_timeout=30, stop_timeout=1)
    specs = [ServiceSpec("a", [sys.executable, sys.argv[1], "ok"]),
             ServiceSpec("g", [sys.executable, sys.argv[1], "grandchild-setsid-term"]),
             ServiceSpec("p", [sys.executable, sys.argv[1], "ignore-term"])]
    ready = await launcher.start(specs[:int(sys.argv[2])])
    pids = list(launcher.pids.values()) + [ready["g"].info["grandchild"]]
    print(json.dumps(pids), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

Service = Callable[..., ServiceSpec]


@pytest.fixture
def service(tmp_path: Path) -> Service:
    """Build a ServiceSpec running the test service script in the given mode."""
    script = tmp_path / "service.py"
    script.write_text(SERVICE)

    def make(name: str, mode: str = "ok", **kwargs: object) -> ServiceSpec:
        return ServiceSpec(name, [PY, str(script), mode], **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point wirebus's runtime dir at an empty directory and check that nothing is left in it."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setenv(_paths.RUNTIME_DIR_ENV, str(directory))
    yield directory
    assert sorted(os.listdir(directory)) == []


def _still_running(pids: Iterable[int], within: float) -> set[int]:
    """Wait up to ``within`` seconds (on pidfds) for ``pids`` to exit; return those still up."""
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    try:
        pending = set(fds)
        deadline = time.monotonic() + within
        while pending and (remaining := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(list(pending), [], [], remaining)
            pending -= set(readable)
        return {fds[fd] for fd in pending}
    finally:
        for fd in fds:
            os.close(fd)


def _size(path: str) -> int:
    """The size of the file at ``path``, -1 when there is none."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _log_has(launcher: ServiceLauncher, name: str, text: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return text in Path(launcher.log_path(name)).read_text()
        except (KeyError, OSError):
            return False

    return check


async def test_three_services_report_ready_with_info(service: Service, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    specs = [
        service("logger", env={"FOO": "bar"}),
        service("metrics", cwd=tmp_path),
        service("extra"),
    ]
    async with ServiceLauncher(ready_timeout=30, log_dir=logs) as launcher:
        ready = await launcher.start(specs)
        pids = launcher.pids
        assert list(ready) == ["logger", "metrics", "extra"]
        for name, signal_ in ready.items():
            assert signal_.identity == name
            assert signal_.pid == pids[name] == signal_.info["pid"]
            assert signal_.info["stdin"] == "/dev/null"
            assert signal_.info["wirebus_env"] == ["WIREBUS_LAUNCH"]  # the launch marker
        assert ready["logger"].info["foo"] == "bar"
        assert ready["metrics"].info["cwd"] == str(tmp_path)
        assert _still_running(pids.values(), 0) == set(pids.values())
        codes = await launcher.stop()
    assert codes == {"logger": 0, "metrics": 0, "extra": 0}
    assert _still_running(pids.values(), 0) == set()
    assert "started logger" in (logs / "logger.log").read_text()
    assert "stop requested" in (logs / "logger.log").read_text()


@pytest.mark.parametrize(
    ("mode", "returncode", "words"),
    [
        ("crash", 3, ["code 3", "exit-time", "boom on stderr"]),
        ("raise", 1, ["code 1", "RuntimeError: bad config xyz"]),
        ("killself", -signal.SIGKILL, ["SIGKILL"]),
    ],
)
async def test_exit_before_ready_is_reported_at_once_and_siblings_are_stopped(
    service: Service, private_tmp: Path, mode: str, returncode: int, words: list[str]
) -> None:
    launcher = ServiceLauncher(ready_timeout=30)
    started = time.monotonic()
    with pytest.raises(ServiceStartupError) as info:
        await launcher.start([service("a"), service("b", "never"), service("bad", mode)])
    reported = time.monotonic()
    error = info.value
    assert error.name == "bad"
    assert error.returncode == returncode
    assert "'bad'" in str(error)
    assert "before it was ready" in str(error)
    for word in words:
        assert word in str(error)
    assert reported - started < 10
    if mode == "crash":
        exit_time = float(error.log_tail.split("exit-time ")[1].split()[0])
        assert reported - exit_time < 1.0
    assert _still_running(launcher.pids.values(), 0) == set()
    assert (await launcher.stop())["bad"] == returncode


async def test_never_ready_times_out_naming_it(service: Service, private_tmp: Path) -> None:
    launcher = ServiceLauncher(ready_timeout=2)
    started = time.monotonic()
    with pytest.raises(ReadyTimeoutError) as info:
        await launcher.start([service("a"), service("slow", "never")])
    assert 2 <= time.monotonic() - started < 6
    assert isinstance(info.value, TimeoutError)
    assert info.value.missing == ["slow"]
    assert "['slow']" in str(info.value)
    assert "waiting" in str(info.value)
    assert _still_running(launcher.pids.values(), 0) == set()
    assert await launcher.stop() == {"a": 0, "slow": 0}


async def test_stale_or_foreign_ready_signals_do_not_count(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = ServiceLauncher(ready_timeout=3)
    specs = [service("a"), service("old", "stale"), service("x", "intruder")]
    with (
        caplog.at_level(logging.WARNING, logger="wirebus.ready"),
        pytest.raises(ReadyTimeoutError) as info,
    ):
        await launcher.start(specs)
    assert info.value.missing == ["old", "x"]
    messages = [record.getMessage() for record in caplog.records]
    assert any("'stale-token'" in message and "'old'" in message for message in messages)
    assert any("'intruder'" in message for message in messages)


async def test_sigterm_ignoring_services_are_killed_at_one_total_deadline(
    service: Service,
) -> None:
    async with ServiceLauncher() as launcher:
        await launcher.start(
            [service("x", "ignore-term"), service("y", "ignore-term"), service("z")]
        )
        started = time.monotonic()
        codes = await launcher.stop(timeout=1.0)
        elapsed = time.monotonic() - started
    assert codes == {"x": -signal.SIGKILL, "y": -signal.SIGKILL, "z": 0}
    assert 1.0 <= elapsed < 1.8
    assert await launcher.stop() == codes


@pytest.mark.parametrize(
    ("how", "slow"),
    [("term", False), ("ignore", True), ("setsid-term", False), ("setsid-ignore", True)],
)
async def test_stop_ends_the_services_own_children(service: Service, how: str, slow: bool) -> None:
    async with ServiceLauncher() as launcher:
        ready = await launcher.start([service("gc", f"grandchild-{how}")])
        grandchild = ready["gc"].info["grandchild"]
        assert _still_running([grandchild], 0) == {grandchild}
        started = time.monotonic()
        codes = await launcher.stop(timeout=1.0)
        elapsed = time.monotonic() - started
    assert codes == {"gc": 0}
    assert _still_running([grandchild], 2) == set()
    assert (elapsed >= 1.0) is slow


async def test_stop_ends_a_new_session_left_behind_by_a_service_that_died(
    service: Service,
) -> None:
    async with ServiceLauncher() as launcher:
        ready = await launcher.start([service("gc", "grandchild-setsid-ignore")])
        grandchild = ready["gc"].info["grandchild"]
        os.kill(launcher.pids["gc"], signal.SIGKILL)
        assert _still_running([launcher.pids["gc"]], 10) == set()
        assert _still_running([grandchild], 0) == {grandchild}
        codes = await launcher.stop(timeout=1.0)
    assert codes == {"gc": -signal.SIGKILL}
    assert _still_running([grandchild], 2) == set()


async def test_a_service_cannot_report_ready_for_another(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    launcher = ServiceLauncher(ready_timeout=3)
    with (
        caplog.at_level(logging.WARNING, logger="wirebus.ready"),
        pytest.raises(ReadyTimeoutError) as info,
    ):
        await launcher.start([service("a", "spoof"), service("b", "never")])
    assert info.value.missing == ["b"]
    assert any("'b'" in record.getMessage() for record in caplog.records)


async def test_notify_ready_works_inside_run_service(service: Service) -> None:
    async with ServiceLauncher(ready_timeout=10) as launcher:
        ready = await launcher.start([service("n", "notify")])
        assert ready["n"].info == {"via": "notify_ready"}
        assert ready["n"].pid == launcher.pids["n"]


async def test_every_spec_is_checked_before_anything_is_spawned(
    service: Service, tmp_path: Path
) -> None:
    launcher = ServiceLauncher()
    with pytest.raises(ServiceStartupError, match="cwd") as info:
        await launcher.start([service("a"), service("b", cwd=tmp_path / "missing")])
    assert info.value.name == "b"
    assert str(tmp_path / "missing") in str(info.value)
    assert launcher.pids == {}
    assert await launcher.stop() == {}


def _children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) == pid:
                    found.add(int(entry))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize(
    ("services", "kill_watchdog"),
    [(3, False), (2, True)],
    ids=["watchdog-ends-any-service", "run_service-alone-ends-itself"],
)
def test_services_end_when_the_launching_process_is_killed(
    tmp_path: Path, services: int, kill_watchdog: bool
) -> None:
    script = tmp_path / "service.py"
    script.write_text(SERVICE)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    parent = subprocess.Popen(
        [PY, "-c", PARENT, str(script), str(services)],
        env={**os.environ, _paths.RUNTIME_DIR_ENV: str(runtime)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    assert parent.stdout is not None
    pids: list[int] = []
    try:
        readable, _, _ = select.select([parent.stdout], [], [], 30)
        assert readable, "the launching process did not start its services"
        pids = json.loads(parent.stdout.readline())
        assert len(pids) == services + 1
        assert _still_running(pids, 0) == set(pids)
        assert len(os.listdir(runtime)) == 2  # the log and the ready-socket directories
        watchdogs = _children_of(parent.pid) - set(pids)
        assert len(watchdogs) == 1
        watchdog = watchdogs.pop()
        if kill_watchdog:
            os.kill(watchdog, signal.SIGKILL)
        parent.kill()
        parent.wait()
        started = time.monotonic()
        assert _still_running(pids, 10) == set()
        assert time.monotonic() - started < 8
        if not kill_watchdog:  # the watchdog removes the log and ready-socket directories
            assert _still_running([watchdog], 10) == set()
            assert os.listdir(runtime) == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
        for pid in _still_running(pids, 0):
            os.kill(pid, signal.SIGKILL)


async def test_the_event_loop_keeps_running_during_start_and_stop(service: Service) -> None:
    loop = asyncio.get_running_loop()
    stamps: list[float] = []

    async def ticker() -> None:
        while True:
            stamps.append(loop.time())
            await asyncio.sleep(0.005)

    task = asyncio.ensure_future(ticker())
    try:
        async with ServiceLauncher() as launcher:
            await launcher.start([service("a"), service("b"), service("c", "ignore-term")])
            ticks_at_ready = len(stamps)
            await launcher.stop(timeout=1.0)
    finally:
        task.cancel()
    assert ticks_at_ready >= 10
    assert len(stamps) - ticks_at_ready >= 60
    assert max(later - earlier for earlier, later in itertools.pairwise(stamps)) < 0.4


async def test_output_goes_to_a_log_file_that_never_fills_up(service: Service) -> None:
    async with ServiceLauncher(ready_timeout=30) as launcher:
        await launcher.start([service("chatty", "chatty")])
        log = launcher.log_path("chatty")
        assert _size(log) >= 2 << 20
        with pytest.raises(KeyError, match="nope"):
            launcher.log_path("nope")
    assert _size(log) == -1


async def test_cancelling_start_stops_everything_and_reraises(service: Service) -> None:
    launcher = ServiceLauncher(ready_timeout=30)
    starting = asyncio.ensure_future(launcher.start([service("a"), service("n", "never")]))
    await wait_until_async(_log_has(launcher, "n", "waiting"), "n's log to say waiting")
    await wait_until_async(_log_has(launcher, "a", "started a"), "a's log to say started")
    pids = launcher.pids
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert _still_running(pids.values(), 0) == set()
    assert await launcher.stop() == {"a": 0, "n": 0}


async def test_stop_from_another_task_cancels_a_start_in_progress(service: Service) -> None:
    launcher = ServiceLauncher(ready_timeout=30)
    starting = asyncio.ensure_future(launcher.start([service("n", "never")]))
    await wait_until_async(_log_has(launcher, "n", "waiting"), "n's log to say waiting")
    assert await launcher.stop() == {"n": 0}
    with pytest.raises(asyncio.CancelledError):
        await starting


async def test_a_second_signal_cancels_a_main_that_ignores_the_stop(service: Service) -> None:
    async with ServiceLauncher() as launcher:
        await launcher.start([service("s", "stubborn")])
        pid = launcher.pids["s"]
        os.kill(pid, signal.SIGTERM)
        await wait_until_async(_log_has(launcher, "s", "stop requested"), "s to log its stop", 10)
        assert _still_running([pid], 0) == {pid}
        os.kill(pid, signal.SIGTERM)
        assert _still_running([pid], 10) == set()
        assert await launcher.stop() == {"s": 0}


async def test_fifty_start_stop_cycles_leave_nothing_behind(private_tmp: Path) -> None:
    code = (
        "from wirebus.service import run_service\n"
        "async def main(s):\n    s.ready()\n    await s.stopped()\n"
        "run_service(main)"
    )
    pids: list[int] = []
    for _ in range(50):
        async with ServiceLauncher(stop_timeout=5) as launcher:
            await launcher.start([ServiceSpec("t", [PY, "-c", code])])
            pids.extend(launcher.pids.values())
        assert await launcher.stop() == {"t": 0}
    assert len(set(pids)) == 50
    assert _still_running(pids, 0) == set()


async def test_a_missing_program_is_reported_by_name_before_anything_is_spawned(
    service: Service, private_tmp: Path
) -> None:
    launcher = ServiceLauncher()
    with pytest.raises(ServiceStartupError, match="/no/such/program") as info:
        await launcher.start([service("a"), ServiceSpec("ghost", ["/no/such/program"])])
    assert info.value.name == "ghost"
    assert info.value.returncode is None
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert launcher.pids == {}
    assert await launcher.stop() == {}


async def test_a_program_that_cannot_be_executed_is_reported_and_the_others_stopped(
    service: Service, private_tmp: Path, tmp_path: Path
) -> None:
    program = tmp_path / "garbage"
    program.write_bytes(b"\x7fELF not really")
    program.chmod(0o755)
    launcher = ServiceLauncher()
    with pytest.raises(ServiceStartupError, match="garbage") as info:
        await launcher.start([service("a"), ServiceSpec("bad", [str(program)])])
    assert info.value.name == "bad"
    assert isinstance(info.value.__cause__, OSError)
    assert _still_running(launcher.pids.values(), 0) == set()
    assert list(await launcher.stop()) == ["a"]


async def test_start_validates_before_spawning_and_only_once(service: Service) -> None:
    launcher = ServiceLauncher()
    with pytest.raises(ValueError, match="duplicate service name 'a'"):
        await launcher.start([service("a"), service("a")])
    assert launcher.pids == {}
    with pytest.raises(TypeError, match="ServiceSpec"):
        await launcher.start([("a", ["true"])])  # type: ignore[list-item]
    async with launcher:
        assert await launcher.start([]) == {}
        with pytest.raises(RuntimeError, match="starts once; this one is open"):
            await launcher.start([service("b")])
    assert launcher.pids == {}


async def test_stop_before_start_is_a_no_op() -> None:
    launcher = ServiceLauncher()
    assert await launcher.stop() == {}
    with pytest.raises(ValueError, match="timeout"):
        await launcher.stop(timeout=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ready_timeout": 0}, "ready_timeout"),
        ({"ready_timeout": -1}, "ready_timeout"),
        ({"stop_timeout": 0.0}, "stop_timeout"),
        ({"stop_timeout": float("nan")}, "stop_timeout"),
    ],
)
def test_launcher_rejects_non_positive_timeouts(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServiceLauncher(**kwargs)


@pytest.mark.parametrize(
    ("name", "argv", "error", "match"),
    [
        ("", ["true"], ValueError, "name"),
        ("a/b", ["true"], ValueError, "'a/b'"),
        ("..", ["true"], ValueError, "'..'"),
        ("a", "python -c pass", TypeError, "one string"),
        ("a", [], ValueError, "empty"),
        ("a", ["true", 3], TypeError, "str"),
    ],
)
def test_service_spec_rejects_bad_names_and_argv(
    name: str, argv: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ServiceSpec(name, argv)  # type: ignore[arg-type]


def test_service_spec_rejects_non_str_env() -> None:
    with pytest.raises(TypeError, match="env"):
        ServiceSpec("a", ["true"], env={"N": 1})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "x" * 300}, "name .*300"),
        ({"argv": ["true", "a\0b"]}, "argv"),
        ({"env": {"N": "a\0b"}}, "env"),
        ({"env": {"N\0": "v"}}, "env"),
        ({"env": {"A=B": "v"}}, "env"),
        ({"env": {"": "v"}}, "env"),
        ({"cwd": "/tmp\0x"}, "cwd"),
    ],
)
def test_service_spec_rejects_what_could_only_fail_at_spawn(
    kwargs: dict[str, Any], match: str
) -> None:
    fields: dict[str, Any] = {"name": "a", "argv": ["true"], **kwargs}
    with pytest.raises(ValueError, match=match):
        ServiceSpec(**fields)


async def test_service_context_outside_a_launcher() -> None:
    context = ServiceContext()
    context.ready({"ignored": True})
    assert not context.stop_requested
    asyncio.get_running_loop().call_soon(context.request_stop)
    await asyncio.wait_for(context.stopped(), 5)
    assert context.stop_requested


def test_a_launcher_closes_the_resource_way_from_sync_code_too(service: Service) -> None:
    async def start(launcher: ServiceLauncher) -> dict[str, int]:
        await launcher.start([service("a"), service("t", "ignore-term")])
        return launcher.pids

    with ServiceLauncher(stop_timeout=1) as launcher:
        pids = asyncio.run(start(launcher))
        assert "open" in repr(launcher)
    assert "closed" in repr(launcher)
    assert _still_running(pids.values(), 0) == set()
    assert asyncio.run(launcher.stop()) == {"a": 0, "t": -signal.SIGKILL}
    launcher.close()


async def test_close_while_starting_says_to_await_stop(service: Service) -> None:
    launcher = ServiceLauncher(ready_timeout=30)
    starting = asyncio.ensure_future(launcher.start([service("n", "never")]))
    await wait_until_async(_log_has(launcher, "n", "waiting"), "n's log to say waiting")
    with pytest.raises(RuntimeError, match="await stop"):
        launcher.close()
    await launcher.aclose()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert await launcher.stop() == {"n": 0}
