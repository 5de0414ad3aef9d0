"""Pub/sub throughput and latency: wirebus against hand-written pyzmq, side by side.

Every figure is a publisher process and a subscriber process over ipc, EventRecords of about
60-80 bytes, measured interleaved in the same run (median of the rounds), so the ratios hold
even though the machine's speed drifts.

    python benchmarks/bench_transport.py [--rounds 3] [--records 200000]

Targets: wirebus >= 10x one send_multipart per record; >= 0.9x 64 records per msgpack
message; one-way latency p99 at a paced 10k records/s <= 1.5x single-frame pyzmq.

The wirebus latency publisher is an asyncio program that lets its loop run after each
publish() (how wirebus is meant to be used; the loop sends). The row after it is the same
publisher used without an event loop, where the writer thread sends.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from wirebus import EventRecord, EventRecordCodec, SampleEventType
from wirebus.record import SAMPLE_TOPIC
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber

CODEC = EventRecordCodec()
ENCODER = msgspec.msgpack.Encoder()
BATCH = 64
LATENCY_RATE = 10_000
LATENCY_SECONDS = 2.0


def _record(i: int, timestamp_ns: int | None = None) -> EventRecord:
    return EventRecord(
        SampleEventType.ISSUED,
        timestamp_ns=i if timestamp_ns is None else timestamp_ns,
        sample_uuid=f"{i:08x}",
    )


def _records(n: int) -> list[EventRecord]:
    """Records built up front, frozen out of the cyclic GC's sight so it never walks them."""
    records = [_record(i) for i in range(n)]
    gc.freeze()
    return records


# -- publishers (child processes) -----------------------------------------------------------


def _xpub(address: str) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    """A hand-written publisher: connect an XPUB and wait for the subscription."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(address)
    sock.recv()
    return ctx, sock


def pub_multipart(address: str, n: int) -> None:
    records = _records(n)
    ctx, sock = _xpub(address)
    for record in records:
        sock.send_multipart([SAMPLE_TOPIC, ENCODER.encode(record)])
    sock.close(linger=-1)
    ctx.term()


def pub_batched(address: str, n: int) -> None:
    records = _records(n)
    ctx, sock = _xpub(address)
    for start in range(0, n, BATCH):
        sock.send_multipart([SAMPLE_TOPIC, ENCODER.encode(records[start : start + BATCH])])
    sock.close(linger=-1)
    ctx.term()


def pub_wirebus(address: str, n: int) -> None:
    records = _records(n)

    async def run() -> None:
        with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
            await publisher.wait_for_subscribers(timeout=30)
            for record in records:
                publisher.publish(record)

    asyncio.run(run())


def _paced(n: int, send: Callable[[int], None]) -> None:
    """Call send(i) for i in range(n) at LATENCY_RATE per second, on schedule."""
    start = time.monotonic()
    interval = 1 / LATENCY_RATE
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - start) / interval) + 1)
        while i < due:
            send(i)
            i += 1
        time.sleep(max(0.0, start + i * interval - time.monotonic()))


async def _paced_async(n: int, send: Callable[[int], None]) -> None:
    """_paced in a coroutine that lets its event loop run after each item.

    The waits stay in time.sleep: the loop's own timers sleep in whole milliseconds, which
    would turn the even 10k/s into bursts of ten. So the arrival times match _paced's.
    """
    start = time.monotonic()
    interval = 1 / LATENCY_RATE
    for i in range(n):
        send(i)
        await asyncio.sleep(0)
        time.sleep(max(0.0, start + (i + 1) * interval - time.monotonic()))  # noqa: ASYNC251


def pub_latency_raw(address: str, n: int) -> None:
    ctx, sock = _xpub(address)
    _paced(n, lambda i: sock.send(SAMPLE_TOPIC + ENCODER.encode(_record(i, time.monotonic_ns()))))
    sock.close(linger=-1)
    ctx.term()


def pub_latency_wirebus(address: str, n: int) -> None:
    async def run() -> None:
        with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
            await publisher.wait_for_subscribers(timeout=30)
            await _paced_async(n, lambda i: publisher.publish(_record(i, time.monotonic_ns())))

    asyncio.run(run())


def pub_latency_wirebus_sync(address: str, n: int) -> None:
    """A publisher used without an event loop: its writer thread sends."""
    with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
        asyncio.run(publisher.wait_for_subscribers(timeout=30))
        _paced(n, lambda i: publisher.publish(_record(i, time.monotonic_ns())))


# -- subscribers (child processes): bind, say "ready", receive n, print JSON -------------------


def _raw_sub(address: str) -> tuple[zmq.Context[Any], zmq.Socket[bytes]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(address)
    print("ready", flush=True)
    return ctx, sock


def sub_multipart(address: str, n: int) -> dict[str, float]:
    ctx, sock = _raw_sub(address)
    decode = CODEC.decode
    _, payload = sock.recv_multipart()
    decode(payload)
    first = time.perf_counter()
    for _ in range(n - 1):
        _, payload = sock.recv_multipart()
        decode(payload)
    elapsed = time.perf_counter() - first
    sock.close(linger=0)
    ctx.term()
    return {"rate": (n - 1) / elapsed}


def sub_batched(address: str, n: int) -> dict[str, float]:
    ctx, sock = _raw_sub(address)
    decoder = msgspec.msgpack.Decoder(list[EventRecord], dec_hook=CODEC._dec_hook)
    _, payload = sock.recv_multipart()
    got = len(decoder.decode(payload))
    first = time.perf_counter()
    while got < n:
        _, payload = sock.recv_multipart()
        got += len(decoder.decode(payload))
    elapsed = time.perf_counter() - first
    sock.close(linger=0)
    ctx.term()
    return {"rate": (n - BATCH) / elapsed}


class _Counter(ZmqMessageSubscriber[EventRecord]):
    def __init__(self, address: str, n: int, latency: bool) -> None:
        super().__init__(CODEC, address, connect=False)
        self.n = n
        self.got = 0
        self.first = 0.0
        self.latency = latency
        self.delays: list[int] = []
        self.done = asyncio.Event()

    async def process(self, items: list[EventRecord]) -> None:
        if not self.got:
            self.first = time.perf_counter()
        self.got += len(items)
        if self.latency:
            now = time.monotonic_ns()
            self.delays.extend(now - r.timestamp_ns for r in items)
        if self.got >= self.n:
            self.done.set()


def sub_wirebus(address: str, n: int, latency: bool = False) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with _Counter(address, n, latency) as sub:
            print("ready", flush=True)
            await sub.done.wait()
            elapsed = time.perf_counter() - sub.first
            if latency:
                return _percentiles(sub.delays)
            return {"rate": (n - 1) / elapsed, "messages": sub.stats.messages}

    return asyncio.run(run())


def sub_latency_raw(address: str, n: int) -> dict[str, float]:
    ctx, sock = _raw_sub(address)
    decode = CODEC.decode
    delays = []
    for _ in range(n):
        frame = sock.recv()
        record = decode(memoryview(frame)[len(SAMPLE_TOPIC) :])
        delays.append(time.monotonic_ns() - record.timestamp_ns)
    sock.close(linger=0)
    ctx.term()
    return _percentiles(delays)


def _percentiles(delays_ns: list[int]) -> dict[str, float]:
    steady = sorted(delays_ns[len(delays_ns) // 10 :])  # skip the warm-up tenth
    return {
        "p50_us": steady[len(steady) // 2] / 1000,
        "p99_us": steady[int(len(steady) * 0.99)] / 1000,
    }


ROLES: dict[str, Callable[..., Any]] = {
    "pub-multipart": pub_multipart,
    "pub-batched": pub_batched,
    "pub-wirebus": pub_wirebus,
    "pub-latency-raw": pub_latency_raw,
    "pub-latency-wirebus": pub_latency_wirebus,
    "pub-latency-wirebus-sync": pub_latency_wirebus_sync,
    "sub-multipart": sub_multipart,
    "sub-batched": sub_batched,
    "sub-wirebus": sub_wirebus,
    "sub-latency-raw": sub_latency_raw,
    "sub-latency-wirebus": lambda address, n: sub_wirebus(address, n, latency=True),
}


# -- the parent: run pairs, interleaved ------------------------------------------------------


def _pair(sub_role: str, pub_role: str, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="wirebus-bench-") as tmp:
        address = f"ipc://{tmp}/bench.sock"
        me = [sys.executable, __file__, "--role"]
        sub = subprocess.Popen([*me, sub_role, address, str(n)], stdout=subprocess.PIPE, text=True)
        assert sub.stdout is not None
        assert sub.stdout.readline().strip() == "ready"
        pub = subprocess.Popen([*me, pub_role, address, str(n)])
        result = json.loads(sub.stdout.readline())
        for proc in (sub, pub):
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        sub.stdout.close()
        return result  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--role", nargs=3, metavar=("ROLE", "ADDRESS", "N"))
    args = parser.parse_args()
    if args.role:
        role, address, n = args.role
        result = ROLES[role](address, int(n))
        if result is not None:
            print(json.dumps(result), flush=True)
        return

    n = args.records
    latency_n = int(LATENCY_RATE * LATENCY_SECONDS)
    runs: dict[str, list[dict[str, Any]]] = {}
    plan = [
        ("wirebus", "sub-wirebus", "pub-wirebus", n),
        ("multipart", "sub-multipart", "pub-multipart", n // 4),
        ("batched64", "sub-batched", "pub-batched", n),
        ("lat-wirebus", "sub-latency-wirebus", "pub-latency-wirebus", latency_n),
        ("lat-raw", "sub-latency-raw", "pub-latency-raw", latency_n),
        ("lat-wirebus-sync", "sub-latency-wirebus", "pub-latency-wirebus-sync", latency_n),
    ]
    for round_ in range(args.rounds):
        for name, sub_role, pub_role, count in plan:
            runs.setdefault(name, []).append(_pair(sub_role, pub_role, count))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    wirebus = median("wirebus", "rate")
    multipart = median("multipart", "rate")
    batched = median("batched64", "rate")
    p50_w, p99_w = median("lat-wirebus", "p50_us"), median("lat-wirebus", "p99_us")
    p50_r, p99_r = median("lat-raw", "p50_us"), median("lat-raw", "p99_us")
    p50_s, p99_s = median("lat-wirebus-sync", "p50_us"), median("lat-wirebus-sync", "p99_us")
    size = len(CODEC.encode(_record(n))[1])
    print(f"\nPub/sub over ipc, 2 processes, EventRecord of {size} B, median of {args.rounds}")
    print(f"{'measure':<58}{'value':>14}  ratio and target")
    rows = [
        ("wirebus records/s", f"{wirebus:,.0f}", ""),
        ("hand-written send_multipart per record, records/s", f"{multipart:,.0f}", ""),
        ("hand-written 64 per msgpack message, records/s", f"{batched:,.0f}", ""),
        ("wirebus vs send_multipart per record", "", _ratio(wirebus / multipart, 10, True)),
        ("wirebus vs 64 per message", "", _ratio(wirebus / batched, 0.9, True)),
        (f"latency p50 @ {LATENCY_RATE:,}/s: wirebus / single frame (us)",
         f"{p50_w:.0f} / {p50_r:.0f}", f"{p50_w / p50_r:.2f}x"),
        (f"latency p99 @ {LATENCY_RATE:,}/s: wirebus / single frame (us)",
         f"{p99_w:.0f} / {p99_r:.0f}", _ratio(p99_w / p99_r, 1.5, False)),
        ("  the same, publisher without an event loop, p50 / p99 (us)",
         f"{p50_s:.0f} / {p99_s:.0f}", f"p99 {p99_s / p99_r:.2f}x"),
    ]  # fmt: skip
    for label, value, ratio in rows:
        print(f"{label:<58}{value:>14}  {ratio}")
    print(f"wirebus messages per run: {runs['wirebus'][0]['messages']:,} for {n:,} records")


def _ratio(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{value:.2f}x  {sign} {target}x {'PASS' if ok else 'MISS'}"


if __name__ == "__main__":
    main()
