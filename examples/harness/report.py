"""Reads a run's metrics from the aggregator's KV store: any process, any time, no locks.

``python report.py STORE_PATH`` (the path is the aggregator's ready info ``"kvstore"``).
"""

from __future__ import annotations

import sys

from wirebus import KVStoreReader


def report(path: str) -> None:
    with KVStoreReader(path) as reader:
        print(
            f"completed {reader.get('perf_samples_completed'):.0f} requests, "
            f"{reader.get('perf_samples_failed'):.0f} failed, "
            f"{reader.get('perf_output_tokens_per_s'):.0f} output tokens/s"
        )
        for name in ("ttft_ms", "latency_ms", "tpot_ms"):
            p50, p90, p99 = reader.series(name).percentiles([50, 90, 99])
            print(f"{name:<10} p50 {p50:8.2f}  p90 {p90:8.2f}  p99 {p99:8.2f}")


if __name__ == "__main__":
    report(sys.argv[1])
