"""Launcher latencies: crash detection, start of three services, stop.

Run: ``.venv/bin/python benchmarks/bench_launcher.py``. Every figure is the median of several
rounds; each round measures everything once, interleaved, so the VM's drift hits all alike.

- crash before ready: a child prints ``time.monotonic()`` (one clock for every process on
  Linux) and calls ``os._exit(3)``; the figure is the time from that stamp to the moment
  ``start()`` raises ``ServiceStartupError``.
- start: ``start()`` of three trivial ``run_service`` services until all are ready, next to a
  bare ``python -c pass`` and a ``python -c "import wirebus.launcher"`` (the floor of any
  service written in Python with wirebus) measured in the same round.
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
CRASH = "import os, time\nprint(time.monotonic(), flush=True)\nos._exit(3)"
SERVICE = (
    "from wirebus.launcher import run_service\n"
    "async def main(service):\n"
    "    service.ready({'pid': __import__('os').getpid()})\n"
    "    await service.stopped()\n"
    "run_service(main)"
)


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


def _run(code: str) -> float:
    started = time.monotonic()
    subprocess.run([PY, "-c", code], check=True)
    return time.monotonic() - started


def _verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "MISS"


async def main() -> None:
    crash: list[float] = []
    start: list[float] = []
    stop: list[float] = []
    bare: list[float] = []
    imports: list[float] = []
    for _ in range(ROUNDS):
        crash.append(await _crash_latency())
        bare.append(_run("pass"))
        imports.append(_run("import wirebus.launcher"))
        took_start, took_stop = await _start_and_stop()
        start.append(took_start)
        stop.append(took_stop)

    def ms(values: list[float]) -> float:
        return statistics.median(values) * 1000

    print(
        f"wirebus launcher benchmark: median of {ROUNDS} rounds, Python "
        f"{sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    print(
        f"  crash before ready -> ServiceStartupError   {ms(crash):7.1f} ms   "
        f"target <= 100 ms   {_verdict(ms(crash), 100)}"
    )
    print(f"  start() of 3 trivial services -> all ready {ms(start):7.1f} ms")
    print(f"      bare `python -c pass`                  {ms(bare):7.1f} ms   (same run)")
    print(f"      `python -c 'import wirebus.launcher'`  {ms(imports):7.1f} ms   (same run)")
    print(
        f"  stop() of 3 services honouring SIGTERM     {ms(stop):7.1f} ms   "
        f"target <= 200 ms   {_verdict(ms(stop), 200)}"
    )


if __name__ == "__main__":
    asyncio.run(main())
