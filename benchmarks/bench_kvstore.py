"""Speed of wirebus.kvstore against its baselines, measured side by side in one run.

Run it with ``.venv/bin/python benchmarks/bench_kvstore.py``. Each round runs every operation
once, in a rotating order, so drift of the machine's speed hits all of them alike; the table
shows the median time over the rounds and the median of the rounds' ratios to the baseline
(each ratio from one round, seconds apart: steadier than a ratio of medians on a shared
machine; higher is better for the write paths).

- ``counter.inc()`` and ``gauge.set()`` against prometheus_client's
  ``MmapedDict.write_value`` (the store behind its multiprocess mode) and against the raw
  operation on a ``memoryview.cast("d")`` of an mmap in a Python loop (``mv[i] += 1.0`` for
  ``inc``, ``mv[i] = v`` for ``set``);
- ``series.append()`` of lognormal values, histogram and summary upkeep included, against
  ``MmapedDict.write_value`` of the same values;
- a fresh reader's p50/p90/p99 of a 1M-value series, and ``snapshot()`` of 1,000 keys (450
  counters, 450 gauges and 100 series of 1,000 values) after the writer changed every key.
"""

from __future__ import annotations

import gc
import mmap
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable

from prometheus_client.mmap_dict import MmapedDict

from wirebus.kvstore import BasicKVStore, KVStoreReader

ROUNDS = 15
N = 100_000

Bench = Callable[[list[float]], float]


def _per_op(loop: Callable[[], None], n: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        loop()
        return (time.perf_counter() - start) / n * 1e9
    finally:
        gc.enable()


def main() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(0.0, 2.0) for _ in range(N)]
    workdir = tempfile.mkdtemp(prefix="wirebus-bench-", dir="/dev/shm")
    raw_fd = os.open(os.path.join(workdir, "raw"), os.O_RDWR | os.O_CREAT, 0o600)
    os.posix_fallocate(raw_fd, 0, mmap.PAGESIZE)
    raw_mm = mmap.mmap(raw_fd, mmap.PAGESIZE)
    raw = memoryview(raw_mm).cast("d")
    prom = MmapedDict(os.path.join(workdir, "prom.db"))
    store = BasicKVStore()
    try:
        rows = _measure(store, prom, raw, values)
        percentile_ms = _measure_percentiles(store, rng)
        snapshot_ms = _measure_snapshot(store, rng)
    finally:
        raw.release()
        raw_mm.close()
        os.close(raw_fd)
        prom.close()
        store.unlink()
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
    _print_table(rows, percentile_ms, snapshot_ms)


def _measure(
    store: BasicKVStore, prom: MmapedDict, raw: memoryview[float], values: list[float]
) -> dict[str, list[float]]:
    counter = store.counter("bench_counter")
    gauge = store.gauge("bench_gauge")
    n = len(values)

    def md_write() -> None:
        write = prom.write_value
        for v in values:
            write("bench", v, 0.0)

    def raw_inc() -> None:
        mv = raw
        for _ in values:
            mv[3] += 1.0

    def raw_set() -> None:
        mv = raw
        for v in values:
            mv[3] = v

    def counter_inc() -> None:
        inc = counter.inc
        for _ in values:
            inc()

    def gauge_set() -> None:
        set_ = gauge.set
        for v in values:
            set_(v)

    appended = [0]

    def series_append() -> None:
        appended[0] += 1
        append = store.series(f"bench_series_{appended[0]}").append
        for v in values:
            append(v)

    loops = {
        "md_write": md_write,
        "raw_inc": raw_inc,
        "raw_set": raw_set,
        "counter_inc": counter_inc,
        "gauge_set": gauge_set,
        "series_append": series_append,
    }
    samples: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for r in range(ROUNDS):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            samples[name].append(_per_op(loops[name], n))
    return samples


def _measure_percentiles(store: BasicKVStore, rng: random.Random) -> float:
    store.series("million").extend(rng.lognormvariate(0.0, 1.0) for _ in range(1_000_000))
    times = []
    for _ in range(ROUNDS):
        with KVStoreReader(store.path) as reader:
            view = reader.series("million")
            start = time.perf_counter()
            view.percentiles([50, 90, 99])
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _measure_snapshot(store: BasicKVStore, rng: random.Random) -> float:
    counters = [store.counter(f"snap_counter_{i}") for i in range(450)]
    gauges = [store.gauge(f"snap_gauge_{i}") for i in range(450)]
    series = [store.series(f"snap_series_{i}") for i in range(100)]
    for s in series:
        s.extend(rng.lognormvariate(0.0, 1.0) for _ in range(1000))
    times = []
    with KVStoreReader(store.path) as reader:
        for _ in range(ROUNDS):
            for c in counters:
                c.inc()
            for g in gauges:
                g.set(rng.random())
            for s in series:
                s.append(rng.lognormvariate(0.0, 1.0))
            start = time.perf_counter()
            snap = reader.snapshot()
            times.append((time.perf_counter() - start) * 1e3)
            assert len(snap) >= 1000, len(snap)
    return statistics.median(times)


def _print_table(rows: dict[str, list[float]], percentile_ms: float, snapshot_ms: float) -> None:
    def ratio_line(label: str, ours: str, base: str, target: float) -> str:
        ratio = statistics.median(b / o for b, o in zip(rows[base], rows[ours], strict=True))
        verdict = "PASS" if ratio >= target else "MISS"
        goal = f">= {target:g}x"
        ours_ns, base_ns = statistics.median(rows[ours]), statistics.median(rows[base])
        return (
            f"{label:<44} {ours_ns:>7.0f} ns {base_ns:>7.0f} ns {ratio:>7.2f}x"
            f"   {goal:<9} {verdict}"
        )

    def time_line(label: str, ms: float, target: float) -> str:
        verdict = "PASS" if ms <= target else "MISS"
        goal = f"<= {target:g} ms"
        return f"{label:<44} {ms:>7.2f} ms {'':>10} {'':>8}   {goal:<9} {verdict}"

    print(f"wirebus.kvstore benchmark: {ROUNDS} interleaved rounds of {N:,} ops, medians")
    print(f"{'operation':<44} {'kvstore':>10} {'baseline':>10} {'ratio':>8}   target")
    print(ratio_line("counter.inc() vs MmapedDict.write_value", "counter_inc", "md_write", 2))
    print(ratio_line("gauge.set() vs MmapedDict.write_value", "gauge_set", "md_write", 2))
    print(ratio_line("counter.inc() vs raw mv[i] += 1.0", "counter_inc", "raw_inc", 0.5))
    print(ratio_line("gauge.set() vs raw mv[i] = v", "gauge_set", "raw_set", 0.5))
    print(ratio_line("series.append() vs MmapedDict.write_value", "series_append", "md_write", 1))
    print(time_line("reader p50/p90/p99 of a 1M-value series", percentile_ms, 5))
    print(time_line("reader snapshot() of 1,000 keys (100 series)", snapshot_ms, 5))


if __name__ == "__main__":
    main()
