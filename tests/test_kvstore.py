"""wirebus.kvstore on real files in /dev/shm, with writers and readers in real processes.

Helper processes run this file as a script (``python tests/test_kvstore.py <role> ...``); they
synchronise by polling the store itself and marker files against a deadline, never by sleeping
a fixed time. PITFALLS.md items and the tests that catch them: 11 (zero-filling stores) the
hammer test and the AST test; 12 (publication order) the three "not yet visible" tests and the
hammer test; 13 and 15 (growth and a full tmpfs) the tmpfs test; 14 (remapping) the hammer
test's inode/size check; 16 (leaked files) the lifecycle and cleanup tests; 17 (format version)
the version test; 18 (permissions) the mode tests; 19 (msync) the AST test; 20 (resource
tracker) the other-process readers test.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import mmap
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import wirebus.kvstore as kvstore
from _support import wait_until
from wirebus import _paths
from wirebus.errors import KVStoreError
from wirebus.kvstore import BasicKVStore, KVStore, KVStoreReader, SeriesSummary, cleanup_stale

HERE = Path(__file__).resolve()


def spawn(role: str, *args: object, capture: bool = True) -> subprocess.Popen[str]:
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, str(HERE), role, *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=pipe,
        stderr=pipe,
        text=True,
    )


def reap(*procs: subprocess.Popen[str]) -> None:
    """Kill and reap every helper still running (after a failure)."""
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            proc.communicate(timeout=30)


def chunk_files(path: str | Path) -> list[str]:
    return sorted(name for name in os.listdir(path) if name.startswith("chunk-"))


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory in /dev/shm to put stores in; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="wirebus-kvtest-", dir=_paths.shm_dir()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def store() -> Iterator[BasicKVStore]:
    s = BasicKVStore()
    yield s
    s.unlink()


@pytest.fixture
def reader(store: BasicKVStore) -> Iterator[KVStoreReader]:
    with KVStoreReader(store.path) as r:
        yield r


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal, with NaN equal to NaN and the sign of zero significant."""
    return len(a) == len(b) and all(
        struct.pack("<d", x) == struct.pack("<d", y) or (x != x and y != y)
        for x, y in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Helper processes


HAMMER_CHECKS = 20  # checks each reader makes while the writer is still writing


def _hammer_writer(path: str, done: str, seconds: str, readers: str) -> None:
    """Write for at least ``seconds`` and until every reader has made its checks (markers
    ``done.<pid>``), so a slow machine that starts the readers late still overlaps them."""
    store = BasicKVStore(path)
    folder, marker = os.path.split(done)
    try:
        requests, clock, latency = (
            store.counter("requests"),
            store.gauge("clock"),
            store.series("s"),
        )
        deadline = time.monotonic() + float(seconds)
        i = n = 0
        while n < 4_000_000 and (
            time.monotonic() < deadline
            or sum(name.startswith(marker + ".") for name in os.listdir(folder)) < int(readers)
        ):
            for _ in range(64):
                i += 1
                requests.inc()
                clock.set(i)
                latency.append(float(n + 1))
                latency.extend([float(x) for x in range(n + 2, n + 34)])
                n += 33
            store.counter(f"late_{i}").set(i)
    finally:
        store.close()
        Path(done).touch()


def _hammer_reader(path: str, done: str) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(path, "chunk-000000")) and time.monotonic() < deadline:
        time.sleep(0.002)
    errors: list[str] = []
    checks = overlapped = seen = 0
    with KVStoreReader(path) as reader:
        while len(reader.keys()) < 3 and time.monotonic() < deadline:
            time.sleep(0.002)
        last_requests = last_clock = 0.0
        keys: list[str] = []
        view = None
        while True:
            finished = os.path.exists(done)
            requests, clock = reader.get("requests"), reader.get("clock")
            if requests < last_requests or clock < last_clock:
                errors.append(f"went back: {last_requests}->{requests}, {last_clock}->{clock}")
            last_requests, last_clock = requests, clock
            if view is None:
                view = reader.series("s")
            new = view.values(seen)
            if new != [float(x) for x in range(seen + 1, seen + 1 + len(new))]:
                errors.append(f"values from {seen} are not a prefix: {new[:3]}")
            seen += len(new)
            summary = view.summary()
            n = summary.count
            if n and (summary.sum, summary.min, summary.max) != (n * (n + 1) / 2, 1.0, n):
                errors.append(f"inconsistent summary {summary}")
            if n and abs(summary.p50 - (n - 1) // 2 - 1) > 0.01 * ((n - 1) // 2 + 1):
                errors.append(f"p50 {summary.p50} of 1..{n}")
            now = reader.keys()
            if now[: len(keys)] != keys:
                errors.append(f"keys changed: {keys[:5]} -> {now[:5]}")
            keys = now
            for key in keys[-3:]:
                if key.startswith("late_") and reader.get(key) not in (0.0, float(key[5:])):
                    errors.append(f"{key} = {reader.get(key)}")
            checks += 1
            if finished:
                break
            overlapped += 1
            if overlapped == HAMMER_CHECKS:
                Path(f"{done}.{os.getpid()}").touch()
    report = {"checks": checks, "overlapped": overlapped, "seen": seen, "keys": len(keys)}
    print(json.dumps({**report, "errors": errors[:10]}))


def _appender(path: str) -> None:
    store = BasicKVStore(path)
    series, counter = store.series("s"), store.counter("appends")
    i = 0
    while True:
        i += 1
        series.append(float(i))
        counter.inc()


def _second_writer(path: str) -> None:
    try:
        BasicKVStore(path)
    except KVStoreError as exc:
        print(f"refused: {exc}")


# ---------------------------------------------------------------------------------------------
# Writer and reader basics


def test_round_trip_of_counters_gauges_and_series(
    store: BasicKVStore, reader: KVStoreReader
) -> None:
    requests, depth, latency = store.counter("requests"), store.gauge("depth"), store.series("lat")
    requests.inc()
    requests.inc(2.5)
    depth.set(-3.0)
    latency.extend([3.0, 1.0, 2.0])
    assert isinstance(store, KVStore)
    assert (requests.value, depth.value, len(latency)) == (3.5, -3.0, 3)
    assert reader.keys() == ["requests", "depth", "lat"]
    assert reader.get("requests") == 3.5
    assert reader.get("depth") == -3.0
    view = reader.series("lat")
    assert view.values() == [3.0, 1.0, 2.0]
    assert view.values(1) == [1.0, 2.0]
    assert view.values(7) == []
    assert (len(view), view.mean(), view.min(), view.max()) == (3, 2.0, 1.0, 3.0)
    middle = view.percentile(50)
    assert abs(middle - 2.0) <= 0.02
    assert reader.snapshot() == {
        "requests": 3.5,
        "depth": -3.0,
        "lat": SeriesSummary(3, 0, 6.0, 2.0, 1.0, 3.0, middle, middle, middle),
    }
    requests.set(0.0)
    assert reader.get("requests") == 0.0


def test_asking_again_returns_the_same_handle_and_another_kind_is_refused(
    store: BasicKVStore,
) -> None:
    counter, series = store.counter("hits"), store.series("lat")
    assert store.counter("hits") is counter
    assert store.series("lat") is series
    with pytest.raises(TypeError, match="'hits' is a counter, not a gauge"):
        store.gauge("hits")
    with pytest.raises(TypeError, match="'lat' is a series, not a counter"):
        store.counter("lat")
    with pytest.raises(AttributeError):
        series.inc()  # type: ignore[attr-defined]


def test_keys_and_values_added_after_a_reader_opened_become_visible(
    store: BasicKVStore, reader: KVStoreReader
) -> None:
    assert reader.keys() == []
    assert reader.snapshot() == {}
    first = store.series("first")
    view = reader.series("first")
    assert len(view) == 0
    assert math.isnan(view.mean())
    assert math.isnan(view.percentile(50))
    for i in range(20_000):
        first.append(float(i))
        if i % 5000 == 0:
            store.gauge(f"g{i}").set(i)
    assert len(view) == 20_000
    assert view.values(19_998) == [19_998.0, 19_999.0]
    assert reader.keys() == ["first", "g0", "g5000", "g10000", "g15000"]
    assert reader.get("g15000") == 15000.0
    with pytest.raises(KeyError, match="'nope'"):
        reader.get("nope")


def test_nan_inf_and_signed_zero_are_stored_faithfully(
    store: BasicKVStore, reader: KVStoreReader
) -> None:
    store.counter("c").set(math.nan)
    store.gauge("up").set(math.inf)
    store.gauge("down").set(-math.inf)
    store.gauge("zero").set(-0.0)
    assert math.isnan(reader.get("c"))
    assert reader.get("up") == math.inf
    assert reader.get("down") == -math.inf
    assert math.copysign(1.0, reader.get("zero")) == -1.0
    values = [0.0, -0.0, math.inf, -math.inf, math.nan, 0, False, 5.0, -5.0, 1e-310]
    store.series("s").extend(values)
    view = reader.series("s")
    assert same_floats(view.values(), [float(v) for v in values])
    summary = view.summary()
    assert (summary.count, summary.nan_count, summary.min, summary.max) == (
        10,
        1,
        -math.inf,
        math.inf,
    )
    assert math.isnan(summary.sum)
    assert view.percentiles([0, 100]) == [-math.inf, math.inf]
    assert view.percentile(50) == 0.0


def test_a_series_spans_many_segments_and_chunks(store: BasicKVStore) -> None:
    series = store.series("big")
    series.extend(float(i) for i in range(300_000))
    assert len(chunk_files(store.path)) >= 3
    with KVStoreReader(store.path) as reader:
        values = reader.series("big").values()
    assert values == [float(i) for i in range(300_000)]


# ---------------------------------------------------------------------------------------------
# Concurrency: real processes


def test_readers_never_see_torn_values_while_a_writer_hammers_and_grows(shm_dir: Path) -> None:
    path, done = shm_dir / "store", shm_dir / "done"
    readers = [spawn("hammer-reader", path, done) for _ in range(2)]
    writer = spawn("hammer-writer", path, done, 1.2, len(readers))
    try:
        wait_until(lambda: (path / "chunk-000000").exists(), "the writer's store")
        files: dict[str, tuple[int, int]] = {}
        while writer.poll() is None:
            for name in chunk_files(path):
                info = os.stat(path / name)
                assert files.setdefault(name, (info.st_ino, info.st_size)) == (
                    info.st_ino,
                    info.st_size,
                ), f"{name} was replaced or resized under readers"
            time.sleep(0.01)
        _, err = writer.communicate(timeout=30)
        assert writer.returncode == 0, err
        reports = []
        for proc in readers:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            reports.append(json.loads(out))
    finally:
        reap(writer, *readers)
    with KVStoreReader(path) as reader:
        final = reader.series("s")
        n = len(final)
        assert final.values() == [float(x) for x in range(1, n + 1)]
        assert reader.get("requests") == reader.get("clock") == n // 33
        keys = len(reader.keys())
    for report in reports:
        assert report["errors"] == []
        assert report["overlapped"] >= HAMMER_CHECKS, report
        assert report["seen"] == n
        assert report["keys"] == keys
    assert len(chunk_files(path)) >= 4, "the series should have grown over several chunks"
    assert cleanup_stale(shm_dir) == [str(path)]


def test_writer_killed_mid_append_leaves_a_consistent_prefix(shm_dir: Path) -> None:
    path = shm_dir / "store"
    proc = spawn("appender", path, capture=False)
    try:
        wait_until(lambda: (path / "chunk-000000").exists(), "the appender's store")
        with KVStoreReader(path) as reader:
            wait_until(lambda: reader.keys() == ["s", "appends"], "the keys")
            view = reader.series("s")
            wait_until(lambda: len(view) > 50_000, "50,000 values")
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            n = len(view)
            assert view.values() == [float(i) for i in range(1, n + 1)]
        with KVStoreReader(path) as fresh:
            summary = fresh.series("s").summary()
            assert summary.count == n
            assert summary.sum == n * (n + 1) / 2
            assert (summary.min, summary.max) == (1.0, n)
            assert fresh.get("appends") in (n - 1, n)
        live = BasicKVStore(shm_dir / "live")
        try:
            assert cleanup_stale(shm_dir) == [str(path)]
            assert not path.exists()
            assert (shm_dir / "live" / "lock").exists()
        finally:
            live.unlink()
    finally:
        reap(proc)


def test_a_second_writer_is_refused(store: BasicKVStore) -> None:
    with pytest.raises(KVStoreError, match=f"already has a writer \\(pid {os.getpid()}\\)"):
        BasicKVStore(store.path)
    proc = spawn("second-writer", store.path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.startswith("refused: ")
    assert "already has a writer" in out
    store.counter("still").inc()
    assert store.counter("still").value == 1.0


def test_readers_in_other_processes_leave_the_store_intact(store: BasicKVStore) -> None:
    store.series("s").extend([1.0, 2.0])
    code = (
        "import sys; from wirebus.kvstore import KVStoreReader as R; print(R(sys.argv[1]).keys())"
    )
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code, store.path], capture_output=True, text=True, timeout=30
        )
        assert out.stdout.strip() == "['s']", out.stderr
    assert sorted(os.listdir(store.path)) == ["chunk-000000", "lock"]
    with KVStoreReader(store.path) as reader:
        assert reader.series("s").values() == [1.0, 2.0]


# ---------------------------------------------------------------------------------------------
# The protocol: stores that are not visible yet are never read


def writable_chunk(path: str, index: int) -> tuple[int, mmap.mmap]:
    fd = os.open(os.path.join(path, f"chunk-{index:06d}"), os.O_RDWR)
    return fd, mmap.mmap(fd, 0)


def test_a_value_slot_not_yet_visible_ends_the_prefix(store: BasicKVStore) -> None:
    store.series("s").extend(float(i) for i in range(1, 101))
    fd, mm = writable_chunk(store.path, 0)
    try:
        at = mm.find(struct.pack("<d", 51.0))
        assert at > 0
        assert at % 8 == 0
        mm[at : at + 8] = bytes(8)
        with KVStoreReader(store.path) as reader:
            view = reader.series("s")
            assert view.values() == [float(i) for i in range(1, 51)]
            assert (len(view), view.summary().sum) == (50, 1275.0)
            mm[at : at + 8] = struct.pack("<d", 51.0)
            assert view.values(50) == [float(i) for i in range(51, 101)]
            assert (len(view), view.max()) == (100, 100.0)
    finally:
        mm.close()
        os.close(fd)


def test_a_key_record_not_yet_committed_is_not_listed(store: BasicKVStore) -> None:
    store.counter("alpha").inc()
    store.counter("beta").inc(2)
    fd, mm = writable_chunk(store.path, 0)
    try:
        name_at = mm.find(b"beta\0\0\0\0")
        assert name_at > 0
        with KVStoreReader(store.path) as reader:
            mm[name_at] = ord("B")
            assert reader.keys() == ["alpha"]
            mm[name_at] = ord("b")
            commit = mm[name_at - 32 : name_at - 24]
            mm[name_at - 32 : name_at - 24] = bytes(8)
            assert reader.keys() == ["alpha"]
            mm[name_at - 32 : name_at - 24] = commit
            assert reader.keys() == ["alpha", "beta"]
            assert reader.get("beta") == 2.0
    finally:
        mm.close()
        os.close(fd)


def series_block(path: str, name: str) -> tuple[int, int]:
    """Chunk index and byte offset of series ``name``'s block, found as docs/kvstore.md says:
    from the first-key word of chunk 0 (byte 32) along the records' next words (byte 8), to
    the record whose name (from byte 32) is ``name`` and its data offset (byte 24)."""
    chunk0 = Path(path, "chunk-000000").read_bytes()
    (record,) = struct.unpack_from("<q", chunk0, 32)
    while record:
        _, next_record, meta, data = struct.unpack_from("<4q", chunk0, record)
        if chunk0[record + 32 : record + 32 + (meta >> 8)] == name.encode():
            return divmod(data, 1 << 20)
        record = next_record
    raise AssertionError(f"no record {name!r} in chunk 0")


def published_count(path: str, name: str) -> int:
    """The count word of series ``name``'s published summary (byte 0 of its block)."""
    chunk, offset = series_block(path, name)
    data = Path(path, f"chunk-{chunk:06d}").read_bytes()
    count: int = struct.unpack_from("<q", data, offset)[0]
    return count


def test_a_summary_that_does_not_validate_is_never_used(store: BasicKVStore) -> None:
    series = store.series("t")
    series.extend(float(i) for i in range(1, 20_001))
    assert published_count(store.path, "t") > 8192, "the writer should have published a summary"
    chunk, block = series_block(store.path, "t")
    offset = block + 16  # the sum of the published summary
    fd, mm = writable_chunk(store.path, chunk)
    try:
        good = mm[offset : offset + 8]
        mm[offset : offset + 8] = struct.pack("<d", 12345.0)
        with KVStoreReader(store.path) as reader:
            summary = reader.series("t").summary()
        assert (summary.count, summary.sum, summary.max) == (20_000, 200_010_000.0, 20_000.0)
        assert abs(summary.p50 - 10_000) <= 100
        mm[offset : offset + 8] = good
    finally:
        mm.close()
        os.close(fd)


def test_the_writer_never_calls_msync_or_struct_pack_into() -> None:
    package = Path(kvstore.__file__).parent
    called = {
        node.func.attr
        for module in package.glob("*.py")
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert "write_summary" in called, "the walk should see the writer's calls"
    assert not called & {"flush", "msync", "pack_into"}


# ---------------------------------------------------------------------------------------------
# Percentiles


lognormal = st.builds(
    lambda seed, sigma, n: [random.Random(seed).lognormvariate(0.0, sigma) for _ in range(n)],
    st.integers(0, 2**32),
    st.floats(0.1, 4.0),
    st.integers(1, 12_000),
)
mixed = st.lists(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=False),
        st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan]),
    ),
    min_size=1,
    max_size=400,
)
moderate = st.lists(st.floats(-1e6, 1e6, allow_subnormal=False), min_size=1, max_size=3000)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.one_of(lognormal, mixed, moderate))
def test_percentiles_are_within_one_percent_of_the_exact_values(values: list[float]) -> None:
    with BasicKVStore() as store, KVStoreReader(store.path) as reader:
        store.series("s").extend(values)
        view = reader.series("s")
        assert same_floats(view.values(), values)
        clean = sorted(v for v in values if v == v)
        summary = view.summary()
        assert (summary.count, summary.nan_count) == (len(values), len(values) - len(clean))
        if not clean:
            assert math.isnan(summary.p50)
            assert math.isnan(summary.min)
            return
        assert (summary.min, summary.max) == (clean[0], clean[-1])
        if all(abs(v) < 1e300 for v in clean):
            exact_sum = math.fsum(clean)
            assert abs(summary.sum - exact_sum) <= 1e-9 * math.fsum(abs(v) for v in clean)
        qs = [0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100]
        for q, estimate in zip(qs, view.percentiles(qs), strict=True):
            exact = clean[int(q * (len(clean) - 1) / 100)]
            if exact == 0 or math.isinf(exact):
                assert estimate == exact, (q, estimate, exact)
            else:
                assert abs(estimate - exact) <= 0.01 * abs(exact), (q, estimate, exact)


@pytest.mark.parametrize(
    "draw",
    [
        lambda r: r.lognormvariate(-3.0, 1.5),
        lambda r: r.uniform(-1e3, 1e3),
        lambda r: r.expovariate(1e-6),
        lambda r: r.choice([0.0, -2.5, 1e-200, 7e200, math.inf, math.nan]) * r.random(),
    ],
    ids=["lognormal", "uniform", "exponential", "mixed"],
)
def test_percentiles_of_published_and_unpublished_values(
    store: BasicKVStore, reader: KVStoreReader, draw: Callable[[random.Random], float]
) -> None:
    rng = random.Random(7)
    values = [draw(rng) for _ in range(30_000)]
    series = store.series("s")
    view = reader.series("s")
    for end in (5_000, 25_000, 30_000):
        series.extend(values[len(series) : end])
        clean = sorted(v for v in values[:end] if v == v)
        qs = [0, 0.1, 5, 50, 95, 99, 99.99, 100]
        for q, estimate in zip(qs, view.percentiles(qs), strict=True):
            exact = clean[int(q * (len(clean) - 1) / 100)]
            assert abs(estimate - exact) <= 0.01 * abs(exact) or estimate == exact, (q, end)
    assert published_count(store.path, "s") > 16_000, "most values should be published"


@pytest.mark.parametrize(
    ("q", "error", "match"),
    [
        (101, ValueError, "101"),
        (-1, ValueError, "-1"),
        (math.nan, ValueError, "nan"),
        ("50", TypeError, "'50'"),
        (None, TypeError, "None"),
    ],
)
def test_percentile_arguments_are_checked(
    store: BasicKVStore, reader: KVStoreReader, q: object, error: type[Exception], match: str
) -> None:
    store.series("s").append(1.0)
    with pytest.raises(error, match=match):
        reader.series("s").percentile(q)  # type: ignore[arg-type]
    with pytest.raises(error, match=match):
        reader.series("s").percentiles([50, q])  # type: ignore[list-item]


# ---------------------------------------------------------------------------------------------
# Lifecycle, files and permissions


def test_the_default_store_is_private() -> None:
    old = os.umask(0)
    try:
        store = BasicKVStore()
    finally:
        os.umask(old)
    try:
        store.series("s").extend(range(100_000))
        assert Path(store.path).parent == Path(_paths.shm_dir())
        assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o700
        names = os.listdir(store.path)
        assert len(names) >= 2
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(store.path, name)).st_mode) == 0o600
    finally:
        store.unlink()


def test_mode_lets_a_group_read_whatever_the_umask(shm_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        store = BasicKVStore(shm_dir / "s", mode=0o640)
    finally:
        os.umask(old)
    with store:
        assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o750
        for name in os.listdir(store.path):
            assert stat.S_IMODE(os.stat(os.path.join(store.path, name)).st_mode) == 0o640
    assert not (shm_dir / "s").exists()


@pytest.mark.parametrize(
    ("mode", "error", "match"),
    [
        (0o666, ValueError, "0o666"),
        (0o400, ValueError, "0o400"),
        (0o1600, ValueError, "0o1600"),
        ("600", TypeError, "'600'"),
    ],
)
def test_unsafe_modes_are_refused(
    shm_dir: Path, mode: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        BasicKVStore(shm_dir / "s", mode=mode)  # type: ignore[arg-type]
    assert os.listdir(shm_dir) == []


def test_close_keeps_the_files_and_unlink_removes_them(shm_dir: Path) -> None:
    store = BasicKVStore(shm_dir / "s")
    counter, series = store.counter("c"), store.series("s")
    counter.inc(4)
    series.extend([1.0, 2.0])
    store.close()
    store.close()
    with KVStoreReader(store.path) as reader:
        assert reader.get("c") == 4.0
        assert reader.series("s").values() == [1.0, 2.0]
    with pytest.raises(RuntimeError, match="closed"):
        counter.inc()
    with pytest.raises(RuntimeError, match="closed"):
        series.append(3.0)
    with pytest.raises(RuntimeError, match="closed"):
        _ = counter.value
    with pytest.raises(RuntimeError, match="closed"):
        store.gauge("g")
    store.unlink()
    store.unlink()
    assert os.listdir(shm_dir) == []


def test_a_store_used_as_a_context_manager_unlinks_the_directory_it_made() -> None:
    with BasicKVStore() as store:
        store.counter("c").inc()
        path = store.path
        assert os.path.isdir(path)
    assert not os.path.exists(path)


def test_a_given_existing_directory_is_closed_not_unlinked(shm_dir: Path) -> None:
    with BasicKVStore(shm_dir) as store:
        store.gauge("g").set(1.0)
    assert sorted(os.listdir(shm_dir)) == ["chunk-000000", "lock"]
    with KVStoreReader(shm_dir) as reader:
        assert reader.get("g") == 1.0
    store.unlink()
    assert os.listdir(shm_dir) == []


def test_a_failed_constructor_leaves_nothing_it_made(shm_dir: Path) -> None:
    (shm_dir / "foreign").write_text("not ours")
    with pytest.raises(KVStoreError, match=r"not empty.*foreign"):
        BasicKVStore(shm_dir)
    assert os.listdir(shm_dir) == ["foreign"]
    with pytest.raises(KVStoreError, match="not a directory"):
        BasicKVStore(shm_dir / "foreign")
    with pytest.raises(KVStoreError, match="cannot create store directory"):
        BasicKVStore(shm_dir / "missing" / "store")
    assert os.listdir(shm_dir) == ["foreign"]


def test_a_store_whose_writer_is_gone_is_not_reopened_for_writing(shm_dir: Path) -> None:
    BasicKVStore(shm_dir / "s").close()
    with pytest.raises(KVStoreError, match=r"writer is gone.*remove_store"):
        BasicKVStore(shm_dir / "s")
    assert sorted(os.listdir(shm_dir / "s")) == ["chunk-000000", "lock"]


def test_cleanup_stale_removes_only_stores_without_a_writer(shm_dir: Path) -> None:
    closed = BasicKVStore(shm_dir / "closed")
    closed.close()
    live = BasicKVStore(shm_dir / "live")
    (shm_dir / "other").mkdir()
    (shm_dir / "other" / "chunk-000000").write_bytes(b"something else")
    try:
        assert cleanup_stale(shm_dir) == [str(shm_dir / "closed")]
        assert sorted(os.listdir(shm_dir)) == ["live", "other"]
        assert cleanup_stale(shm_dir) == []
    finally:
        live.unlink()


def unmount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_a_full_tmpfs_gives_kvstore_error_and_the_store_stays_usable(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    filler = mnt / "filler"

    def fill(leave: int) -> None:
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with open(filler, "ab") as f:
            f.write(bytes(max(0, free - leave)))

    with contextlib.ExitStack() as cleanup:
        cleanup.callback(unmount, mnt)
        fill(512 * 1024)
        with pytest.raises(KVStoreError, match="No space left"):
            BasicKVStore(mnt / "early")
        assert os.listdir(mnt) == ["filler"]
        filler.unlink()

        store = cleanup.enter_context(BasicKVStore(mnt / "s"))
        counter, series = store.counter("c"), store.series("s")
        fill(512 * 1024)
        with pytest.raises(KVStoreError, match="No space left"):
            series.extend(float(i) for i in range(1_000_000))
        n = len(series)
        assert 50_000 < n < 131_072
        with pytest.raises(KVStoreError, match="No space left"):
            series.append(-1.0)
        assert len(series) == n
        counter.inc()
        assert sorted(os.listdir(store.path)) == ["chunk-000000", "lock"]
        reader = cleanup.enter_context(KVStoreReader(store.path))
        assert reader.series("s").values() == [float(i) for i in range(n)]
        assert reader.get("c") == 1.0
        filler.unlink()
        series.append(float(n))
        assert chunk_files(store.path) == ["chunk-000000", "chunk-000001"]
        assert reader.series("s").values(n) == [float(n)]
        reader.close()
        store.unlink()
        assert os.listdir(mnt) == []


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("", ValueError, "empty"),
        ("x" * 256, ValueError, "x" * 256),
        ("ok\ud800", ValueError, "ud800"),
        (42, TypeError, "42"),
        (None, TypeError, "None"),
    ],
)
def test_bad_key_names_are_refused(
    store: BasicKVStore, name: object, error: type[Exception], match: str
) -> None:
    for make in (store.counter, store.gauge, store.series):
        with pytest.raises(error, match=match):
            make(name)  # type: ignore[arg-type]
    assert store.counter("é" * 127).value == 0.0


def test_bad_values_are_refused_with_the_value_named(store: BasicKVStore) -> None:
    counter, gauge, series = store.counter("c"), store.gauge("g"), store.series("s")
    with pytest.raises(TypeError, match="counter 'c': 'x' \\(str\\)"):
        counter.inc("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="increment -1 is negative"):
        counter.inc(-1)
    with pytest.raises(ValueError, match="increment nan"):
        counter.inc(math.nan)
    with pytest.raises(ValueError, match="out of the float64 range"):
        counter.set(10**400)
    with pytest.raises(TypeError, match="gauge 'g': 'x'"):
        gauge.set("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="series 's': 'x'"):
        series.append("x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="series 's': None"):
        series.append(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"series 's': \[1\.0\]"):
        series.extend([2.0, [1.0]])  # type: ignore[list-item]
    assert (counter.value, gauge.value, len(series)) == (0.0, 0.0, 1)


def test_a_reader_refuses_what_is_not_a_store(shm_dir: Path) -> None:
    with pytest.raises(KVStoreError, match="not a store directory"):
        KVStoreReader(shm_dir / "missing")
    (shm_dir / "file").write_text("x")
    with pytest.raises(KVStoreError, match="not a store directory"):
        KVStoreReader(shm_dir / "file")
    (shm_dir / "empty").mkdir()
    with pytest.raises(KVStoreError, match="not a store: it has no chunk-000000"):
        KVStoreReader(shm_dir / "empty")
    (shm_dir / "junk").mkdir()
    (shm_dir / "junk" / "chunk-000000").write_bytes(os.urandom(4096))
    with pytest.raises(KVStoreError, match="not a wirebus store"):
        KVStoreReader(shm_dir / "junk")


def test_a_reader_refuses_another_version_and_truncated_files(shm_dir: Path) -> None:
    BasicKVStore(shm_dir / "s").close()
    chunk = shm_dir / "s" / "chunk-000000"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:8] + struct.pack("<q", 1) + data[16:])
    with pytest.raises(KVStoreError, match="format version 1; this reader reads version 2"):
        KVStoreReader(shm_dir / "s")
    chunk.write_bytes(data[:4096])
    with pytest.raises(KVStoreError, match="truncated: 4096 of 1048576 bytes"):
        KVStoreReader(shm_dir / "s")
    chunk.write_bytes(data[:10])
    with pytest.raises(KVStoreError, match="truncated: 10 bytes"):
        KVStoreReader(shm_dir / "s")


def test_a_reader_refuses_the_wrong_kind_and_use_after_close(
    store: BasicKVStore, reader: KVStoreReader
) -> None:
    store.series("s").append(1.0)
    store.counter("c").inc()
    with pytest.raises(TypeError, match="'s' is a series"):
        reader.get("s")
    with pytest.raises(TypeError, match="'c' is a counter, not a series"):
        reader.series("c")
    view = reader.series("s")
    reader.close()
    reader.close()
    for use in (reader.keys, reader.snapshot, lambda: reader.get("c"), view.values, view.mean):
        with pytest.raises(RuntimeError, match="closed"):
            use()


# ---------------------------------------------------------------------------------------------
# Prometheus exposition


def test_prometheus_text_parses_back(store: BasicKVStore, reader: KVStoreReader) -> None:
    store.counter("http.requests").inc(7)
    store.counter("bytes_total").inc(1.5)
    store.gauge("9lives").set(math.nan)
    store.gauge("a-b").set(math.inf)
    store.gauge("a_b").set(-2.0)
    store.gauge("größe\n").set(1.0)
    store.series("lat ms").extend(float(i) for i in range(1, 101))
    store.series("empty")
    text = reader.to_prometheus(prefix="wb:")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert sorted(families) == [
        "wb:9lives",
        "wb:a_b",
        "wb:a_b_2",
        "wb:bytes",
        "wb:empty",
        "wb:gr__e_",
        "wb:http_requests",
        "wb:lat_ms",
    ]
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for f in families.values()
        for s in f.samples
    }
    assert families["wb:http_requests"].type == "counter"
    assert samples["wb:http_requests_total[]"] == 7.0
    assert samples["wb:bytes_total[]"] == 1.5
    assert math.isnan(samples["wb:9lives[]"])
    assert samples["wb:a_b[]"] == math.inf
    assert samples["wb:a_b_2[]"] == -2.0
    assert families["wb:lat_ms"].type == "summary"
    assert samples["wb:lat_ms_sum[]"] == 5050.0
    assert samples["wb:lat_ms_count[]"] == 100.0
    assert abs(samples["wb:lat_ms[('quantile', '0.99')]"] - 99.0) <= 0.99
    assert math.isnan(samples["wb:empty[('quantile', '0.5')]"])
    assert "wirebus gauge 'größe\\\\n'" in text


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    {
        "hammer-writer": _hammer_writer,
        "hammer-reader": _hammer_reader,
        "appender": _appender,
        "second-writer": _second_writer,
    }[role](*args)
