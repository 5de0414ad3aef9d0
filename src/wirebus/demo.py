"""``wirebus demo``: a whole synthetic benchmark run, end to end, with every part of wirebus.

The harness (this process) binds an event publisher, starts the event logger and the metrics
aggregator with :class:`~wirebus.ServiceLauncher`, and issues simulated streaming requests at a
Poisson rate: a warm-up tenth first, then performance tracking on. A live view follows the
aggregator's :class:`~wirebus.services.metrics_aggregator.MetricsSnapshot` s. At the end it
checks that every event published is a line in the log and an event in the KV store, prints a
summary and writes it to ``OUT/summary.json``. Everything it starts or creates is stopped and
removed when it ends, by Ctrl-C too.

With ``restart_logger`` (``wirebus demo --restart-logger``) the event logger is SIGKILLed a
third of the way through and started again: it goes back to its last checkpoint and fetches
what it missed from the publisher's replay buffer, so the run still ends with every event in
the log once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from wirebus import _paths
from wirebus._endpoint import new_ipc_address, remove_ipc_dir
from wirebus.kvstore import KVStoreReader
from wirebus.launcher import ServiceLauncher, ServiceSpec
from wirebus.services.event_logger import checkpoint_path, log_files
from wirebus.services.event_publisher import EventPublisherService
from wirebus.services.metrics_aggregator import (
    MetricsSnapshot,
    MetricsSnapshotCodec,
    read_snapshot,
    wait_for_events,
)
from wirebus.transport import ZmqMessageSubscriber

__all__ = ["DemoConfig", "DemoResult", "run_demo"]

_LOG = "events.jsonl"


@dataclass(frozen=True)
class DemoConfig:
    """What to simulate. Latencies are drawn per sample; ``seed`` makes a run repeatable."""

    samples: int = 1500
    rate: float = 150.0
    out: Path = Path("demo-out")
    warmup_fraction: float = 0.1
    failure_rate: float = 0.02
    ttft_ms: float = 40.0
    tpot_ms: float = 4.0
    tokens_per_chunk: int = 8
    seed: int = 1
    restart_logger: bool = False

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0, got {self.rate}")


@dataclass(frozen=True)
class DemoResult:
    """Counts of the consistency check and the final metrics."""

    published: int
    logged: int
    stored: int
    snapshot: MetricsSnapshot
    exit_codes: dict[str, int]

    @property
    def lost(self) -> int:
        """Events missing from the log or the store (the larger of the two)."""
        return max(0, self.published - self.logged, self.published - self.stored)

    @property
    def duplicated(self) -> int:
        """Events the log or the store holds more than once (the larger of the two)."""
        return max(0, self.logged - self.published, self.stored - self.published)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0


def _store_dir() -> str:
    return tempfile.mkdtemp(prefix="wirebus-demo-", dir=_paths.shm_dir())


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
        for old in log_files(out / _LOG):
            os.unlink(old)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(checkpoint_path(out / _LOG))
        probe = out / ".writable"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(
            f"--out {str(out)!r} is not a writable directory: {exc.strerror}"
        ) from None
    return out


async def run_demo(
    config: DemoConfig, view: Callable[[MetricsSnapshot | None], None]
) -> DemoResult:
    """Run the synthetic benchmark; ``view`` is called with the newest snapshot 4 times a second."""
    out = _prepare_out(config.out)
    store_dir = _store_dir()
    address = new_ipc_address("events")
    log_dir = str(out / "logs")
    launcher = ServiceLauncher(ready_timeout=30, stop_timeout=10, log_dir=log_dir)
    logger = _RestartableLogger(
        [sys.executable, "-m", "wirebus.services.event_logger",
         "--address", address, "--out", str(out / _LOG)],
        log_dir,
    )  # fmt: skip
    events = EventPublisherService(address)
    try:
        aggregator = ServiceSpec(
            "metrics_aggregator",
            [sys.executable, "-m", "wirebus.services.metrics_aggregator",
             "--address", address, "--store", os.path.join(store_dir, "metrics")],
        )  # fmt: skip
        ready, _ = await asyncio.gather(launcher.start([aggregator]), logger.start())
        await events.wait_for_subscribers(2, timeout=10)
        store_path = ready["metrics_aggregator"].info["kvstore"]
        snapshot_address = ready["metrics_aggregator"].info["snapshot_address"]
        async with ZmqMessageSubscriber(
            MetricsSnapshotCodec(), snapshot_address, conflate=True
        ) as snapshots:
            viewer = asyncio.ensure_future(_follow(snapshots, view))
            try:
                midway = asyncio.Event()
                restart = asyncio.ensure_future(_restart_at(midway, logger, events, config))
                await _simulate(events, config, midway)
                await restart  # a restarted logger catches up when it next hears the publisher
                events.session_ended()
                await events.flush(timeout=10)
                with KVStoreReader(store_path) as reader:
                    with contextlib.suppress(TimeoutError):  # the check below tells the loss
                        await wait_for_events(reader, events.published)
                    stored = int(reader.get("events"))
                    final = read_snapshot(reader)
            finally:
                viewer.cancel()
                await asyncio.gather(viewer, return_exceptions=True)
        view(final)
        codes = {**await logger.stop(), **await launcher.stop()}
        logged = sum(_count_lines(path) for path in log_files(out / _LOG))
        return DemoResult(events.published, logged, stored, final, codes)
    finally:
        await asyncio.gather(launcher.stop(), logger.stop())
        await events.aclose(timeout=2)
        shutil.rmtree(store_dir, ignore_errors=True)
        remove_ipc_dir(address)


class _RestartableLogger:
    """The event logger, in a launcher of its own so that it can be killed and started again
    (as ``event_logger``, then ``event_logger_restarted``)."""

    def __init__(self, argv: list[str], log_dir: str) -> None:
        self._argv = argv
        self._log_dir = log_dir
        self._launchers: list[ServiceLauncher] = []
        self._codes: dict[str, int] = {}

    async def start(self, name: str = "event_logger") -> None:
        launcher = ServiceLauncher(ready_timeout=30, stop_timeout=10, log_dir=self._log_dir)
        self._launchers.append(launcher)
        await launcher.start([ServiceSpec(name, self._argv)])

    async def kill_and_restart(self) -> None:
        """SIGKILL the running logger, then start a new one on the same log."""
        running = self._launchers[-1]
        for pid in running.pids.values():
            os.kill(pid, signal.SIGKILL)
        self._codes.update(await running.stop())
        await self.start("event_logger_restarted")

    async def stop(self) -> dict[str, int]:
        """Stop whichever logger runs; every logger's exit code by name."""
        for launcher in self._launchers:
            self._codes.update(await launcher.stop())
        return dict(self._codes)


async def _restart_at(
    midway: asyncio.Event,
    logger: _RestartableLogger,
    events: EventPublisherService,
    config: DemoConfig,
) -> None:
    if config.restart_logger:
        await midway.wait()
        await logger.kill_and_restart()
        await events.wait_for_subscribers(2, timeout=10)


async def _follow(
    snapshots: ZmqMessageSubscriber[MetricsSnapshot], view: Callable[[MetricsSnapshot | None], None]
) -> None:
    newest: MetricsSnapshot | None = None
    while True:
        with contextlib.suppress(TimeoutError):
            while True:  # take everything queued, keep the newest
                newest = await snapshots.receive(timeout=0.25 if newest is None else 0)
        view(newest)
        await asyncio.sleep(0.25)  # the view's refresh period


async def _simulate(
    events: EventPublisherService, config: DemoConfig, midway: asyncio.Event
) -> None:
    rng = random.Random(config.seed)
    warmup = int(config.samples * config.warmup_fraction)
    tasks = []
    events.session_started()
    for i in range(config.samples):
        if i == warmup:
            events.start_tracking()
        if i == config.samples // 3:
            midway.set()
        tasks.append(asyncio.ensure_future(_sample(events, f"{i:08d}", rng, config)))
        await asyncio.sleep(rng.expovariate(config.rate))  # Poisson arrivals
    events.stop_tracking()
    await asyncio.gather(*tasks)


async def _sample(
    events: EventPublisherService, uuid: str, rng: random.Random, config: DemoConfig
) -> None:
    events.issued(uuid)
    await asyncio.sleep(rng.lognormvariate(0, 0.4) * config.ttft_ms / 1000)
    if rng.random() < config.failure_rate:
        events.failed(uuid, "simulated timeout")
        return
    events.first_chunk(uuid)
    n_tokens = rng.randint(16, 160)
    for _ in range(n_tokens // config.tokens_per_chunk):
        await asyncio.sleep(config.tpot_ms * config.tokens_per_chunk / 1000)
        events.chunk(uuid)
    events.complete(uuid, n_tokens)


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


# -- presentation ----------------------------------------------------------------------------


def progress_line(snapshot: MetricsSnapshot | None, total: int) -> str:
    """One line of live progress, for a terminal or a log."""
    if snapshot is None:
        return "waiting for the first metrics snapshot..."
    v = snapshot.values
    ttft = snapshot.series.get("ttft_ms")
    ttft_text = f"ttft p50 {ttft.p50:6.1f} ms" if ttft and ttft.count else "ttft    -   "
    return (
        f"[{v.get('elapsed_s', 0.0):5.1f}s] issued {int(v.get('samples_issued', 0)):>6}/{total}"
        f"  done {int(v.get('samples_completed', 0)):>6}"
        f"  failed {int(v.get('samples_failed', 0)):>4}"
        f"  in flight {int(v.get('in_flight', 0)):>4}"
        f"  {v.get('perf_samples_per_s', 0.0):7.1f} samples/s  {ttft_text}"
    )


def summary_lines(result: DemoResult) -> list[str]:
    """The end-of-run summary table and the consistency check."""
    v, s = result.snapshot.values, result.snapshot.series
    lines = [
        "",
        "wirebus demo: summary (tracked samples only, warm-up excluded)",
        f"  {'samples issued / completed / failed':<40}"
        f"{int(v['perf_samples_issued'])} / {int(v['perf_samples_completed'])}"
        f" / {int(v['perf_samples_failed'])}",
        f"  {'throughput':<40}{v['perf_samples_per_s']:.1f} samples/s, "
        f"{v['perf_output_tokens_per_s']:.0f} output tokens/s",
        f"  {'':<16}{'count':>8}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}",
    ]
    for name in ("ttft_ms", "latency_ms", "tpot_ms", "chunk_gap_ms"):
        st = s[name]
        lines.append(
            f"  {name:<16}{st.count:>8}{st.mean:>9.2f}{st.p50:>9.2f}{st.p90:>9.2f}"
            f"{st.p99:>9.2f}{st.max:>9.2f}"
        )
    check = (
        f"events published {result.published}, lines in the log {result.logged}, "
        f"events in the store {result.stored}: "
    )
    problems = []
    if result.lost:
        problems.append(f"{result.lost} LOST")
    if result.duplicated:
        problems.append(f"{result.duplicated} DUPLICATED")
    lines.append("")
    lines.append(check + (", ".join(problems) or "0 lost"))
    return lines


def write_summary(result: DemoResult, out: Path) -> None:
    """Write the counts and the final metrics to ``out/summary.json``."""
    summary: dict[str, Any] = {
        "published": result.published,
        "logged": result.logged,
        "stored": result.stored,
        "lost": result.lost,
        "duplicated": result.duplicated,
        "values": result.snapshot.values,
        "series": {name: msgspec.to_builtins(st) for name, st in result.snapshot.series.items()},
        "exit_codes": result.exit_codes,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def plain_view(
    stream: TextIO, total: int, every: float = 1.0
) -> Callable[[MetricsSnapshot | None], None]:
    """A view printing a progress line at most every ``every`` s (for pipes and logs)."""
    last = 0.0

    def show(snapshot: MetricsSnapshot | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= every:
            last = now
            print(progress_line(snapshot, total), file=stream, flush=True)

    return show
