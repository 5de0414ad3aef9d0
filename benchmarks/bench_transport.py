"""Pub/sub throughput, CPU and latency: wirebus against hand-written pyzmq, side by side.

Every figure is a publisher process and a subscriber process over ipc, EventRecords of about
60-80 bytes, measured interleaved in the same run (median of the rounds), so the ratios hold
even though the machine's speed drifts.

    python benchmarks/bench_transport.py [--rounds 5] [--records 200000]

Targets (transport v2): per-item publish() >= 10x one send_multipart per record and >= 0.8x 64
records per msgpack message; publish_many() of 64-item runs >= 0.95x 64 per message;
publisher CPU per item <= 2x one bare msgspec encode; subscriber CPU per item <= 1.15x a
hand-written decode of the same messages; one-way p99 at a paced 10k records/s <= 1.5x
single-frame pyzmq, for a publisher that sleeps between records and one that busy-waits
(yielding to its loop after each record), with and without an event loop.
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
import threading
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
HEADER = 56  # topic + wirebus header: where a run-form message's msgpack array starts
LATENCY_RATE = 10_000
LATENCY_SECONDS = 2.0
CPU = "cpu_per_item"


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


def _encode_cpu(records: list[EventRecord]) -> float:
    """CPU seconds per record of one bare msgspec encode each, in this process."""
    encode = ENCODER.encode
    started = time.process_time()
    for record in records:
        encode(record)
    return (time.process_time() - started) / len(records)


def pub_wirebus(address: str, n: int, many: bool = False, replay: int = 0) -> dict[str, float]:
    records = _records(n)
    bare = _encode_cpu(records)

    async def run() -> float:
        with ZmqMessagePublisher(CODEC, address, bind=False, replay=replay) as publisher:
            await publisher.wait_for_subscribers(timeout=30)
            started = time.process_time()
            if many:
                for start in range(0, n, BATCH):
                    publisher.publish_many(records[start : start + BATCH])
            else:
                for record in records:
                    publisher.publish(record)
            await publisher.flush(timeout=60)
            return (time.process_time() - started) / n

    per_item = asyncio.run(run())
    return {"cpu_per_item": per_item, "bare_encode": bare}


def _paced(n: int, send: Callable[[int], None], busy: bool, between: Callable[[], Any]) -> Any:
    """Call send(i) for i in range(n) at LATENCY_RATE per second, on schedule.

    ``busy``: wait by spinning (a CPU-bound load generator) instead of sleeping; ``between``
    runs after each send (an ``await asyncio.sleep(0)`` for a loop publisher).
    """
    start = time.monotonic()
    interval = 1 / LATENCY_RATE
    for i in range(n):
        send(i)
        between()
        due = start + (i + 1) * interval
        if busy:
            while time.monotonic() < due:
                pass
        else:
            time.sleep(max(0.0, due - time.monotonic()))


async def _paced_async(n: int, send: Callable[[int], None], busy: bool) -> None:
    """_paced in a coroutine that lets its event loop run after each item.

    The waits stay in time.sleep (or a spin): the loop's own timers sleep in whole
    milliseconds, which would turn the even 10k/s into bursts of ten.
    """
    start = time.monotonic()
    interval = 1 / LATENCY_RATE
    for i in range(n):
        send(i)
        await asyncio.sleep(0)
        due = start + (i + 1) * interval
        if busy:
            while time.monotonic() < due:
                pass
        else:
            time.sleep(max(0.0, due - time.monotonic()))  # noqa: ASYNC251


def pub_latency_raw(address: str, n: int, busy: bool = False) -> None:
    ctx, sock = _xpub(address)

    def send(i: int) -> None:
        sock.send(SAMPLE_TOPIC + ENCODER.encode(_record(i, time.monotonic_ns())))

    _paced(n, send, busy, lambda: None)
    sock.close(linger=-1)
    ctx.term()


def pub_latency_wirebus(address: str, n: int, busy: bool = False) -> None:
    async def run() -> None:
        with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
            await publisher.wait_for_subscribers(timeout=30)
            await _paced_async(
                n, lambda i: publisher.publish(_record(i, time.monotonic_ns())), busy
            )

    asyncio.run(run())


def pub_latency_wirebus_thread(address: str, n: int, busy: bool = False) -> None:
    """A publisher used from a plain thread, no event loop in it."""
    with ZmqMessagePublisher(CODEC, address, bind=False) as publisher:
        asyncio.run(publisher.wait_for_subscribers(timeout=30))
        worker = threading.Thread(
            target=_paced,
            args=(
                n,
                lambda i: publisher.publish(_record(i, time.monotonic_ns())),
                busy,
                lambda: None,
            ),
        )
        worker.start()
        worker.join()


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


def sub_raw_decode(address: str, n: int) -> dict[str, float]:
    """A hand-written subscriber of wirebus's own messages: one decode of each message's
    msgpack array, in a tight blocking loop."""
    ctx, sock = _raw_sub(address)
    decoder = msgspec.msgpack.Decoder(list[EventRecord], dec_hook=CODEC._dec_hook)
    got = len(decoder.decode(memoryview(sock.recv())[HEADER:]))
    started = time.process_time()
    first = got
    while got < n:
        got += len(decoder.decode(memoryview(sock.recv())[HEADER:]))
    cpu = (time.process_time() - started) / (got - first)
    sock.close(linger=0)
    ctx.term()
    return {"cpu_per_item": cpu}


class _Counter(ZmqMessageSubscriber[EventRecord]):
    def __init__(self, address: str, n: int, latency: bool) -> None:
        super().__init__(CODEC, address, connect=False)
        self.n = n
        self.got = 0
        self.first = 0.0
        self.first_cpu = 0.0
        self.first_count = 0
        self.latency = latency
        self.delays: list[int] = []
        self.done = asyncio.Event()

    async def process(self, items: list[EventRecord]) -> None:
        if not self.got:
            self.first = time.perf_counter()
            self.first_cpu = time.process_time()
            self.first_count = len(items)
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
            cpu = (time.process_time() - sub.first_cpu) / (sub.got - sub.first_count)
            if latency:
                return _percentiles(sub.delays)
            return {"rate": (n - 1) / elapsed, "messages": sub.stats.messages, "cpu_per_item": cpu}

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
    "pub-wirebus-many": lambda address, n: pub_wirebus(address, n, many=True),
    "pub-wirebus-replay": lambda address, n: pub_wirebus(address, n, replay=n),
    "pub-latency-raw": pub_latency_raw,
    "pub-latency-raw-busy": lambda address, n: pub_latency_raw(address, n, busy=True),
    "pub-latency-wirebus": pub_latency_wirebus,
    "pub-latency-wirebus-busy": lambda address, n: pub_latency_wirebus(address, n, busy=True),
    "pub-latency-wirebus-thread": pub_latency_wirebus_thread,
    "pub-latency-wirebus-thread-busy": lambda a, n: pub_latency_wirebus_thread(a, n, busy=True),
    "sub-multipart": sub_multipart,
    "sub-batched": sub_batched,
    "sub-raw-decode": sub_raw_decode,
    "sub-wirebus": sub_wirebus,
    "sub-latency-raw": sub_latency_raw,
    "sub-latency-wirebus": lambda address, n: sub_wirebus(address, n, latency=True),
}


# -- the parent: run pairs, interleaved ------------------------------------------------------


def _pair(sub_role: str, pub_role: str, n: int) -> dict[str, Any]:
    """Run one subscriber and one publisher; the subscriber's JSON, with the publisher's
    under ``"pub"``."""
    with tempfile.TemporaryDirectory(prefix="wirebus-bench-") as tmp:
        address = f"ipc://{tmp}/bench.sock"
        me = [sys.executable, __file__, "--role"]
        sub = subprocess.Popen([*me, sub_role, address, str(n)], stdout=subprocess.PIPE, text=True)
        assert sub.stdout is not None
        assert sub.stdout.readline().strip() == "ready"
        pub = subprocess.Popen([*me, pub_role, address, str(n)], stdout=subprocess.PIPE, text=True)
        result: dict[str, Any] = json.loads(sub.stdout.readline())
        pub_out, _ = pub.communicate(timeout=120)
        for proc in (sub, pub):
            if proc.wait(timeout=120) != 0:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        sub.stdout.close()
        if pub_out.strip():
            result["pub"] = json.loads(pub_out)
        return result


THROUGHPUT = [
    ("wirebus", "sub-wirebus", "pub-wirebus", 1),
    ("wirebus-many", "sub-wirebus", "pub-wirebus-many", 1),
    ("wirebus-replay", "sub-wirebus", "pub-wirebus-replay", 1),
    ("multipart", "sub-multipart", "pub-multipart", 4),
    ("batched64", "sub-batched", "pub-batched", 1),
    ("raw-decode", "sub-raw-decode", "pub-wirebus", 1),
]
LATENCY = [
    ("lat-raw", "sub-latency-raw", "pub-latency-raw"),
    ("lat-raw-busy", "sub-latency-raw", "pub-latency-raw-busy"),
    ("lat-wirebus", "sub-latency-wirebus", "pub-latency-wirebus"),
    ("lat-wirebus-busy", "sub-latency-wirebus", "pub-latency-wirebus-busy"),
    ("lat-thread", "sub-latency-wirebus", "pub-latency-wirebus-thread"),
    ("lat-thread-busy", "sub-latency-wirebus", "pub-latency-wirebus-thread-busy"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
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
    for round_ in range(args.rounds):
        for name, sub_role, pub_role, divisor in THROUGHPUT:
            runs.setdefault(name, []).append(_pair(sub_role, pub_role, n // divisor))
        for name, sub_role, pub_role in LATENCY:
            runs.setdefault(name, []).append(_pair(sub_role, pub_role, latency_n))
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    def median_ratio(name: str, key: str, other: str, other_key: str) -> float:
        """The median over rounds of one round's ratio (both measured side by side)."""
        return statistics.median(
            a[key] / b[other_key] for a, b in zip(runs[name], runs[other], strict=True)
        )

    def sub_cpu(name: str) -> float:
        return median(name, CPU) * 1e9

    def pub_median(key: str) -> float:
        return statistics.median(r["pub"][key] for r in runs["wirebus"])

    def pub_cpu_ratio(name: str) -> float:
        return statistics.median(
            r["pub"]["cpu_per_item"] / r["pub"]["bare_encode"] for r in runs[name]
        )

    rate = {
        name: median(name, "rate") for name in ("wirebus", "wirebus-many", "multipart", "batched64")
    }
    size = len(CODEC.encode(_record(n))[1])
    print(
        f"\nPub/sub over ipc, 2 processes, EventRecord of {size} B, median of {args.rounds} rounds"
    )
    print(f"{'measure':<66}{'value':>16}  ratio and target")
    rows = [
        ("publish() per item, records/s", f"{rate['wirebus']:,.0f}", ""),
        ("publish_many() of 64-item runs, records/s", f"{rate['wirebus-many']:,.0f}", ""),
        ("hand-written send_multipart per record, records/s", f"{rate['multipart']:,.0f}", ""),
        ("hand-written 64 per msgpack message, records/s", f"{rate['batched64']:,.0f}", ""),
        ("publish() vs send_multipart per record", "",
         _ratio(median_ratio("wirebus", "rate", "multipart", "rate"), 10, True)),
        ("publish() vs 64 per message", "",
         _ratio(median_ratio("wirebus", "rate", "batched64", "rate"), 0.8, True)),
        ("publish_many() vs 64 per message", "",
         _ratio(median_ratio("wirebus-many", "rate", "batched64", "rate"), 0.95, True)),
        ("publish() with replay=N on vs off (nothing missed)", "",
         _ratio(median_ratio("wirebus-replay", "rate", "wirebus", "rate"), 0.9, True)),
        ("publisher CPU per item vs one bare msgspec encode (ns)",
         f"{pub_median('cpu_per_item') * 1e9:.0f} / {pub_median('bare_encode') * 1e9:.0f}",
         _ratio(pub_cpu_ratio("wirebus"), 2, False)),
        ("subscriber CPU per item vs hand-written decode (ns)",
         f"{sub_cpu('wirebus'):.0f} / {sub_cpu('raw-decode'):.0f}",
         _ratio(median_ratio("wirebus", CPU, "raw-decode", CPU), 1.15, False)),
    ]  # fmt: skip
    for name, label, raw in (
        ("lat-wirebus", "loop, sleeping", "lat-raw"),
        ("lat-wirebus-busy", "loop, busy-waiting", "lat-raw-busy"),
        ("lat-thread", "plain thread, sleeping", "lat-raw"),
        ("lat-thread-busy", "plain thread, busy-waiting", "lat-raw-busy"),
    ):
        rows.append((
            f"p99 @ {LATENCY_RATE:,}/s, {label}: wirebus / pyzmq (us)",
            f"{median(name, 'p99_us'):.0f} / {median(raw, 'p99_us'):.0f}",
            _ratio(median_ratio(name, "p99_us", raw, "p99_us"), 1.5, False),
        ))  # fmt: skip
        rows.append((
            "  p50 the same (us)",
            f"{median(name, 'p50_us'):.0f} / {median(raw, 'p50_us'):.0f}",
            f"{median_ratio(name, 'p50_us', raw, 'p50_us'):.2f}x",
        ))  # fmt: skip
    for label, value, ratio in rows:
        print(f"{label:<66}{value:>16}  {ratio}")
    print(f"wirebus messages per run: {runs['wirebus'][0]['messages']:,} for {n:,} records")


def _ratio(value: float, target: float, higher_is_better: bool) -> str:
    ok = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{value:.2f}x  {sign} {target}x {'PASS' if ok else 'MISS'}"


if __name__ == "__main__":
    main()
