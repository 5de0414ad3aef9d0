"""The ``wirebus`` command, run as a real subprocess: demo, tail, kv show, bad input."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

import wirebus
from _support import Tick, wait_until
from wirebus import (
    EventRecord,
    MsgspecCodec,
    SampleEventType,
    ZmqMessagePublisher,
    _paths,
    make_topic,
)
from wirebus.kvstore import BasicKVStore
from wirebus.services.event_logger import log_files
from wirebus.services.event_publisher import EventPublisherService

WIREBUS = [sys.executable, "-m", "wirebus.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WIREBUS, *args], capture_output=True, text=True, timeout=timeout)


def _demo_leftovers() -> list[str]:
    """wirebus services of this test run still running (other runs on the machine are not
    ours to count), and demo stores still in the runtime dir."""
    runtime = _paths.shm_dir()
    left = [e for e in os.listdir(runtime) if e.startswith("wirebus-demo-")]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"wirebus.services." in cmdline and os.fsencode(runtime) in cmdline:
            left.append(f"process {pid}: {cmdline!r}")
    return left


def test_demo_end_to_end_loses_nothing(tmp_path: Path) -> None:
    result = run("demo", "--samples", "200", "--rate", "400", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "0 lost" in result.stdout
    assert "Traceback" not in result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["published"] == summary["logged"] == summary["stored"]
    assert summary["lost"] == 0
    lines = sum(
        len(Path(f).read_bytes().splitlines()) for f in log_files(tmp_path / "events.jsonl")
    )
    assert lines == summary["published"]
    values = summary["values"]
    assert values["samples_issued"] == 200
    assert values["perf_samples_issued"] == 180  # the first tenth is warm-up
    assert values["samples_completed"] + values["samples_failed"] == 200
    assert values["perf_samples_completed"] + values["perf_samples_failed"] == 180
    assert summary["series"]["latency_ms"]["count"] == values["perf_samples_completed"]
    assert summary["exit_codes"] == {"event_logger": 0, "metrics_aggregator": 0}
    assert _demo_leftovers() == []


def test_demo_with_the_logger_killed_and_restarted_still_loses_nothing(tmp_path: Path) -> None:
    result = run(
        "demo", "--samples", "300", "--rate", "300", "--out", str(tmp_path), "--restart-logger"
    )
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert result.returncode == 0, result.stdout[-300:] + result.stderr + logs
    assert result.stdout.rstrip().splitlines()[-2].endswith(": 0 lost")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["exit_codes"] == {
        "event_logger": -signal.SIGKILL,
        "event_logger_restarted": 0,
        "metrics_aggregator": 0,
    }
    assert summary["published"] == summary["logged"] == summary["stored"]
    assert (summary["lost"], summary["duplicated"]) == (0, 0)
    lines = [
        line
        for f in log_files(tmp_path / "events.jsonl")
        for line in Path(f).read_bytes().splitlines()
    ]
    assert len(set(lines)) == len(lines) == summary["published"]  # each event once
    restarted = (tmp_path / "logs" / "event_logger_restarted.log").read_text()
    recovered = int(restarted.split(" recovered")[0].rsplit("(", 1)[1])
    assert recovered > 0, restarted  # what the killed logger missed came from the replay
    assert "0 missed" in restarted
    assert _demo_leftovers() == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stopping_the_demo_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C, a kill, or the terminal going away: services stopped, /dev/shm clean."""
    proc = subprocess.Popen(
        [*WIREBUS, "demo", "--samples", "100000", "--rate", "200", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the first progress line: services up, load running
            if "issued" in line:
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "interrupted" in err
    assert "Traceback" not in err
    wait_until(lambda: not _demo_leftovers(), "the demo's services and store to go", 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bogus"], "invalid choice"),
        (["demo", "--nope"], "unrecognized arguments"),
        (["demo", "--samples", "0"], "samples must be >= 1, got 0"),
        (["demo", "--rate", "-1"], "rate must be > 0, got -1"),
        (["demo", "--samples", "5", "--out", "/proc/wirebus"], "not a writable directory"),
        (["kv", "show", "/etc/hostname"], "cannot open '/etc/hostname' as a KV store"),
        (["tail", "udp://127.0.0.1:9"], "unsupported address 'udp://127.0.0.1:9'"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_tail_says_it_is_waiting_and_times_out(wirebus_address: str) -> None:
    result = run("tail", wirebus_address, "--timeout", "1.5")
    assert result.returncode == 1
    assert f"waiting for records on {wirebus_address}" in result.stderr
    assert "nothing received" in result.stderr


async def test_tail_prints_records_as_json_lines(wirebus_address: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *WIREBUS, "tail", wirebus_address, "--topic", "sample", "--count", "3",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with EventPublisherService(wirebus_address) as events:
            await events.wait_for_subscribers(1, timeout=30)
            events.session_started()  # another topic: filtered out
            for i in range(3):
                events.issued(f"u{i}", timestamp_ns=i)
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines == [
        {"event_type": "sample.issued", "timestamp_ns": i, "sample_uuid": f"u{i}"} for i in range(3)
    ]
    assert EventRecord(SampleEventType.ISSUED).event_type.value == lines[0]["event_type"]


def test_kv_show_table_and_prometheus(tmp_path: Path) -> None:
    with BasicKVStore(tmp_path / "store") as store:
        store.counter("requests").inc(7)
        store.gauge("in_flight").set(3)
        latency = store.series("latency_ms")
        latency.extend([float(v) for v in range(1, 101)])
        table = run("kv", "show", str(store.path))
        prom = run("kv", "show", str(store.path), "--prometheus")
    assert table.returncode == 0, table.stderr
    assert "requests" in table.stdout
    assert "latency_ms" in table.stdout
    rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()[1:]}
    assert float(rows["requests"][0]) == 7
    assert float(rows["in_flight"][0]) == 3
    assert int(rows["latency_ms"][0]) == 100
    assert prom.returncode == 0, prom.stderr
    families = {f.name: f for f in text_string_to_metric_families(prom.stdout)}
    assert families["requests"].samples[0].value == 7
    assert families["latency_ms"].type == "summary"


# -- tail on any bus, --version, bench, bad input ---------------------------------------------


class _BytesCodec:
    """Publishes payloads as given: a bus whose bytes the test chooses."""

    def encode(self, item: bytes) -> tuple[bytes, bytes]:
        return make_topic("raw"), item

    def decode(self, payload: bytes | memoryview) -> bytes:
        return bytes(payload)

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> bytes | None:
        raise exc


async def _tail_while_publishing(
    address: str, items: list[Any], codec: Any, *tail_args: str, cwd: Path | None = None
) -> tuple[int, list[Any], str]:
    """Run ``wirebus tail address *tail_args``, publish ``items`` to it once it has subscribed,
    and return its exit code, its stdout as JSON values and its stderr."""
    proc = await asyncio.create_subprocess_exec(
        *WIREBUS, "tail", address, *tail_args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=cwd,
    )  # fmt: skip
    try:
        with ZmqMessagePublisher(codec, address) as publisher:
            await publisher.wait_for_subscribers(1, timeout=30)
            for item in items:
                publisher.publish(item)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, [json.loads(line) for line in out.splitlines()], err.decode()


async def test_tail_raw_shows_any_msgpack_bus_as_json(wirebus_address: str) -> None:
    codec: MsgspecCodec[dict[str, Any]] = MsgspecCodec(dict[str, Any], topic="mine")
    items = [
        {"seq": 1, "blob": b"\x00\x01"},
        {"seq": 2, "ext": msgspec.msgpack.Ext(5, b"ab"), "nested": [1.5, None, {"k": True}]},
    ]
    code, lines, err = await _tail_while_publishing(
        wirebus_address, items, codec, "--raw", "--count", "2"
    )
    assert code == 0, err
    assert lines == [
        {"seq": 1, "blob": base64.b64encode(b"\x00\x01").decode()},
        {
            "seq": 2,
            "ext": {"msgpack_ext": 5, "data": base64.b64encode(b"ab").decode()},
            "nested": [1.5, None, {"k": True}],
        },
    ]


async def test_tail_raw_says_which_payload_is_not_msgpack(wirebus_address: str) -> None:
    good = msgspec.msgpack.encode({"seq": 1})
    code, lines, err = await _tail_while_publishing(
        wirebus_address, [b"\xc1", good], _BytesCodec(), "--raw", "--count", "1"
    )  # 0xc1 is the one byte msgpack never uses
    assert code == 0, err
    assert lines == [{"seq": 1}]
    assert "a payload of 1 bytes did not decode" in err
    assert "do not decode as" not in err  # the hint is for the built-in decoders only
    assert "Traceback" not in err


async def test_tail_codec_decodes_your_own_type(wirebus_address: str, tmp_path: Path) -> None:
    tmp_path.joinpath("my_messages.py").write_text(
        "import msgspec\n"
        "from wirebus import MsgspecCodec\n\n"
        "class Tick(msgspec.Struct):\n    seq: int\n\n"
        "class TickCodec(MsgspecCodec[Tick]):\n"
        "    def __init__(self):\n        super().__init__(Tick, topic='tick')\n\n"
        "CODEC = TickCodec()\n"
    )
    codec = MsgspecCodec(Tick, topic="tick")
    for spec in ("my_messages:TickCodec", "my_messages:CODEC"):  # a class or a ready object
        code, lines, err = await _tail_while_publishing(
            wirebus_address, [Tick(1), Tick(2)], codec, "--codec", spec, "--count", "2",
            cwd=tmp_path,
        )  # fmt: skip
        assert code == 0, err
        assert lines == [{"seq": 1}, {"seq": 2}]


async def test_tail_on_another_bus_says_so_once(wirebus_address: str) -> None:
    codec = MsgspecCodec(Tick, topic="tick")
    code, lines, err = await _tail_while_publishing(
        wirebus_address, [Tick(1), Tick(2), Tick(3)], codec, "--count", "3"
    )
    assert code == 0, err
    assert len(lines) == 3  # as event records' decode-error fallback, but said once on stderr
    assert err.count("do not decode as event records: --raw shows any msgpack bus") == 1


async def test_tail_into_a_closed_pipe_exits_quietly(wirebus_address: str, tmp_path: Path) -> None:
    """``wirebus tail ... | head -n 1``: no BrokenPipeError traceback, exit 0."""
    err_path = tmp_path / "stderr"
    tail = " ".join([*WIREBUS, "tail", "--raw", wirebus_address])
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", f"set -o pipefail; {tail} 2>{err_path} | head -n 1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        with ZmqMessagePublisher(MsgspecCodec(Tick, topic="tick"), wirebus_address) as publisher:
            await publisher.wait_for_subscribers(1, timeout=30)
            deadline = time.monotonic() + 30
            while proc.returncode is None and time.monotonic() < deadline:
                publisher.publish(Tick(0))  # until tail writes into the pipe head closed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(proc.wait(), 0.05)
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err_path.read_text()
    assert len(out.splitlines()) == 1
    assert err_path.read_text() == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tail", "tcp://127.0.0.1:99999"], "port of 'tcp://127.0.0.1:99999' must be"),
        (["tail", "tcp://127.0.0.1:0"], "port of 'tcp://127.0.0.1:0' must be"),
        (["tail", "tcp://127.0.0.1:http"], "port of 'tcp://127.0.0.1:http' must be"),
        (["tail", "ipc:///x", "--timeout", "nan"], "finite number of seconds, got 'nan'"),
        (["tail", "ipc:///x", "--timeout", "-1"], "finite number of seconds, got '-1'"),
        (["tail", "ipc:///x", "--count", "0"], "an integer >= 1, got '0'"),
        (["tail", "ipc:///x", "--raw", "--snapshots"], "not allowed with argument"),
        (["tail", "ipc:///x", "--codec", "nocolon"], "expected pkg.module:Name"),
        (["tail", "ipc:///x", "--codec", "no_such_module:C"], "cannot import 'no_such_module'"),
        (["tail", "ipc:///x", "--codec", "json:Nope"], "module 'json' has no 'Nope'"),
        (["tail", "ipc:///x", "--codec", "json:dumps"], "is not a MessageCodec"),
        (["bench", "--dir", "/nonexistent"], "they ship with a wirebus source checkout"),
    ],
)
def test_tail_and_bench_bad_input_is_one_line_and_non_zero(args: list[str], message: str) -> None:
    result = run(*args, timeout=20)  # tail used to wait forever on the first two
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wirebus {importlib.metadata.version('wirebus')}\n"
    assert importlib.metadata.version("wirebus") == wirebus.__version__


def test_bench_help_says_it_needs_a_checkout() -> None:
    result = run("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "source checkout" in " ".join(result.stdout.split())
