"""Recovery speed: items fetched from a publisher's replay buffer against the same pair live.

A publisher process (``replay=N``) publishes N EventRecords before anyone listens; a
subscriber joins with ``history=N`` and gets them back, then the publisher sends N more live.
Both rates are measured at the subscriber of the same pair in the same round (median of the
rounds).

    python benchmarks/bench_recovery.py [--rounds 3] [--records 100000]

Target (issue 12): recovering N missed items >= 0.5x the live throughput of the same pair.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from wirebus import EventRecord, EventRecordCodec, SampleEventType
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber

CODEC = EventRecordCodec()


def _records(start: int, stop: int) -> list[EventRecord]:
    return [
        EventRecord(SampleEventType.ISSUED, timestamp_ns=i, sample_uuid=f"{i:016x}")
        for i in range(start, stop)
    ]


def publisher(address: str, n: int) -> None:
    """The publisher process: N items kept for nobody, then one and N more on the stdin
    lines ``history`` and ``live``."""

    async def run() -> None:
        with ZmqMessagePublisher(CODEC, address, replay=n) as pub:
            pub.publish_many(_records(0, n))
            await pub.flush(timeout=60)
            print("published", flush=True)
            assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "history"
            await pub.wait_for_subscribers(timeout=30)
            pub.publish(_records(n, n + 1)[0])  # heard: the history is fetched first
            assert (await asyncio.to_thread(sys.stdin.readline)).strip() == "live"
            for record in _records(n + 1, 2 * n + 1):
                pub.publish(record)
            await pub.flush(timeout=60)

    asyncio.run(run())


class _Counter(ZmqMessageSubscriber[EventRecord]):
    def __init__(self, address: str, n: int) -> None:
        super().__init__(CODEC, address, history=n)
        self.got = 0
        self.target = n + 1
        self.reached = asyncio.Event()

    async def process(self, items: list[EventRecord]) -> None:
        self.got += len(items)
        if self.got >= self.target:
            self.reached.set()


async def _measure(address: str, n: int, command: Callable[[str], None]) -> dict[str, float]:
    """Join with history, then ask for the live items; ``command`` writes to the publisher."""
    async with _Counter(address, n) as sub:
        started = time.perf_counter()
        command("history")
        await asyncio.wait_for(sub.reached.wait(), 120)
        recovered = time.perf_counter() - started
        assert sub.stats.recovered >= n, sub.stats  # the newest n when it asked, or n + 1
        sub.reached.clear()
        sub.target = 2 * n + 1
        started = time.perf_counter()
        command("live")
        await asyncio.wait_for(sub.reached.wait(), 120)
        live = time.perf_counter() - started
    return {"recovered": n / recovered, "live": n / live}


def _round(n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="wirebus-bench-") as tmp:
        address = f"ipc://{tmp}/recovery.sock"
        command = [sys.executable, __file__, "--publisher", address, str(n)]
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        stdin, stdout = proc.stdin, proc.stdout
        assert stdin is not None
        assert stdout is not None

        def say(line: str) -> None:
            stdin.write(line + "\n")
            stdin.flush()

        try:
            assert stdout.readline().strip() == "published"
            result = asyncio.run(_measure(address, n, say))
            stdin.close()
            if proc.wait(timeout=60) != 0:
                raise RuntimeError(f"the publisher exited with {proc.returncode}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            stdout.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--publisher", nargs=2, metavar=("ADDRESS", "N"))
    args = parser.parse_args()
    if args.publisher:
        publisher(args.publisher[0], int(args.publisher[1]))
        return
    runs = [_round(args.records) for _ in range(args.rounds)]
    ratio = statistics.median(r["recovered"] / r["live"] for r in runs)
    recovered = statistics.median(r["recovered"] for r in runs)
    live = statistics.median(r["live"] for r in runs)
    print(f"\nRecovery over ipc, {args.records:,} EventRecords, median of {args.rounds} rounds")
    print(f"{'history fetched from the replay buffer, records/s':<62}{recovered:>16,.0f}")
    print(f"{'the same pair live, records/s':<62}{live:>16,.0f}")
    verdict = "PASS" if ratio >= 0.5 else "MISS"
    print(f"{'recovered vs live':<62}{'':>16}  {ratio:.2f}x  >= 0.5x {verdict}")


if __name__ == "__main__":
    main()
