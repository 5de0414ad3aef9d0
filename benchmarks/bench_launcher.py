"""Launcher latencies and start-up cost: crash detection, imports, start of three services, stop.

Run: ``.venv/bin/python benchmarks/bench_launcher.py``. Every figure is the median of several
rounds; each round measures everything once, interleaved, so the VM's drift hits all alike, and
each ratio compares figures of the same run.

- crash before ready: a child prints ``time.monotonic()`` (one clock for every process on
  Linux) and calls ``os._exit(3)``; the figure is the time from that stamp to the moment
  ``start()`` raises ``ServiceStartupError``.
- import: ``python -c "import wirebus.ready"`` (what a service that reports ready loads) against
  ``python -c "import zmq, msgspec"`` (wirebus's two dependencies); target <= 1.3x.
- start: ``start()`` of three trivial ``run_service`` services until all are ready, against
  starting three ``python -c "import zmq, msgspec"`` processes at once and waiting for them to
  exit; target <= 1.5x.
- stop: ``stop()`` of three services that honour SIGTERM, until every child is reaped.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time

from wirebus.errors import ServiceStartupError
from wirebus.launcher import ServiceLauncher, ServiceSpec

ROUNDS = 7
PY = sys.executable
BARE = "import zmq, msgspec"
CRASH = "import os, time\nprint(time.monotonic(), flush=True)\nos._exit(3)"
SERVICE = (
    "from wirebus.service import run_service\n"
    "async def main(service):\n"
    "    service.ready()\n"
    "    await service.stopped()\n"
    "run_service(main)"
)
IMPORT_TARGET = 1.3
START_TARGET = 1.5


async def _crash_latency() -> float:
    launcher = ServiceLauncher(ready_timeout=30)
    try:
        await launcher.start([ServiceSpec("crash", [PY, "-c", CRASH])])
    except ServiceStartupError as exc:
        detected = time.monotonic()
        if exc.returncode != 3:
            raise
        return detected - float(exc.log_tail.split()[0])
    finally:
        await launcher.stop()
    raise AssertionError("the crashing service was reported ready")


async def _start_and_stop() -> tuple[float, float]:
    launcher = ServiceLauncher(ready_timeout=30)
    try:
        started = time.monotonic()
        await launcher.start([ServiceSpec(name, [PY, "-c", SERVICE]) for name in "abc"])
        ready = time.monotonic()
        codes = await launcher.stop()
        stopped = time.monotonic()
    finally:
        await launcher.stop()
    assert codes == {"a": 0, "b": 0, "c": 0}, codes
    return ready - started, stopped - ready


def _run(code: str, copies: int = 1) -> float:
    """Seconds to start ``copies`` processes running ``code`` at once until all have exited."""
    started = time.monotonic()
    children = [subprocess.Popen([PY, "-c", code]) for _ in range(copies)]
    for child in children:
        if child.wait() != 0:
            raise RuntimeError(f"python -c {code!r} exited with {child.returncode}")
    return time.monotonic() - started


def _verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


async def main() -> None:
    crash: list[float] = []
    start: list[float] = []
    stop: list[float] = []
    bare: list[float] = []
    bare3: list[float] = []
    ready_import: list[float] = []
    for _ in range(ROUNDS):
        crash.append(await _crash_latency())
        bare.append(_run(BARE))
        ready_import.append(_run("import wirebus.ready"))
        bare3.append(_run(BARE, copies=3))
        took_start, took_stop = await _start_and_stop()
        start.append(took_start)
        stop.append(took_stop)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    import_ratio = ms(ready_import) / ms(bare)
    start_ratio = ms(start) / ms(bare3)
    print(
        f"wirebus launcher benchmark: median of {ROUNDS} rounds, Python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"  crash before ready -> ServiceStartupError   {ms(crash):7.1f} ms   "
        f"target <= 100 ms   {_verdict(ms(crash), 100)}"
    )
    print(f"  `python -c 'import wirebus.ready'`         {ms(ready_import):7.1f} ms")
    print(f"      `python -c '{BARE}'`          {ms(bare):7.1f} ms   (same run)")
    print(
        f"      ratio                                  {import_ratio:7.2f} x    "
        f"target <= {IMPORT_TARGET} x   {_verdict(import_ratio, IMPORT_TARGET)}"
    )
    print(f"  start() of 3 trivial services -> all ready {ms(start):7.1f} ms")
    print(f"      3 x `python -c '{BARE}'` at once {ms(bare3):7.1f} ms   (same run)")
    print(
        f"      ratio                                  {start_ratio:7.2f} x    "
        f"target <= {START_TARGET} x   {_verdict(start_ratio, START_TARGET)}"
    )
    print(
        f"  stop() of 3 services honouring SIGTERM     {ms(stop):7.1f} ms   "
        f"target <= 200 ms   {_verdict(ms(stop), 200)}"
    )


if __name__ == "__main__":
    asyncio.run(main())
