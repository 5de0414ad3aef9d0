"""Pub/sub topologies over tcp: one pair, fan-in (4 -> 1), fan-out (1 -> 4), CURVE vs plain.

Every role is a process of its own; the records (EventRecords of about 65 bytes) are built up
front and frozen out of the GC's sight. All figures come from the same run, interleaved
round by round, and are medians over the rounds, so the ratios hold even though the
machine's speed drifts. A rate is items over the time from a subscriber's first item to its
last; an aggregate over several processes spans the earliest first to the latest last item.

    python benchmarks/bench_topologies.py [--rounds 3] [--records 200000]

Fan-in: the subscriber binds, 4 publishers connect and start together on a "go". Fan-out: the
publisher binds, 4 subscribers connect, and it starts once all 4 subscriptions are in. The
pair and CURVE figures use the fan-out layout with one subscriber; CURVE with an allow-list
(a ZAP authenticator), so it is the whole cost of the secure setup.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from wirebus import EventRecord, EventRecordCodec, SampleEventType
from wirebus.security import CurveClient, CurveServer, generate_curve_keypair
from wirebus.transport import ZmqMessagePublisher, ZmqMessageSubscriber

CODEC = EventRecordCodec()
FAN = 4
KEYS_ENV = "WIREBUS_BENCH_CURVE_KEYS"


def _records(n: int) -> list[EventRecord]:
    """Records built up front, frozen out of the cyclic GC's sight so it never walks them."""
    records = [
        EventRecord(SampleEventType.ISSUED, timestamp_ns=i, sample_uuid=f"{i:08x}")
        for i in range(n)
    ]
    gc.freeze()
    return records


def _curve(side: str) -> CurveServer | CurveClient | None:
    keys = os.environ.get(KEYS_ENV)
    if not keys:
        return None
    server, client = json.loads(keys)
    if side == "server":
        return CurveServer(server[0], server[1], allowed_clients=[client[0]])
    return CurveClient(server[0], client[0], client[1])


def _say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# -- roles (child processes) -----------------------------------------------------------------


def role_pub(address: str, n: int, bind: bool, subscribers: int) -> None:
    """Publish n records once ``subscribers`` subscriptions are in (and, connecting, on "go")."""
    records = _records(n)

    async def run() -> None:
        with ZmqMessagePublisher(CODEC, address, bind=bind, curve=_curve("server")) as publisher:
            if bind:
                _say(address=publisher.address)
            await publisher.wait_for_subscribers(subscribers, timeout=60)
            if not bind:
                _say(ready=True)
                sys.stdin.readline()  # "go": every publisher starts at once
            for record in records:
                publisher.publish(record)

    asyncio.run(run())


class _Counter(ZmqMessageSubscriber[EventRecord]):
    def __init__(self, address: str, total: int, connect: bool) -> None:
        curve = _curve("client") if connect else None
        super().__init__(CODEC, address, connect=connect, curve=curve)
        self.total = total
        self.got = 0
        self.first = 0.0
        self.done = asyncio.Event()

    async def process(self, items: list[EventRecord]) -> None:
        if not self.got:
            self.first = time.monotonic()
        self.got += len(items)
        if self.got >= self.total:
            self.done.set()


def role_sub(address: str, total: int, connect: bool) -> None:
    """Receive ``total`` records; report the first and last arrival times."""

    async def run() -> None:
        async with _Counter(address, total, connect) as subscriber:
            _say(address=subscriber.address)
            await subscriber.done.wait()
            last = time.monotonic()
            _say(
                first=subscriber.first,
                last=last,
                rate=(subscriber.got - 1) / (last - subscriber.first),
                dropped=subscriber.stats.dropped,
                received=subscriber.stats.received,
            )

    asyncio.run(run())


# -- the parent ------------------------------------------------------------------------------


class _Child:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--role", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args} exited with {self.proc.wait()}")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.proc.wait(timeout=120) != 0:
            raise RuntimeError(f"{self.proc.args} exited with {self.proc.returncode}")
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _check(results: list[dict[str, Any]], each: int) -> None:
    for result in results:
        if result["received"] != each or result["dropped"]:
            raise RuntimeError(f"lost records: {result}, expected {each}")


def fan_out(n: int, subscribers: int, curve: bool) -> dict[str, float]:
    """One publisher binds, ``subscribers`` connect; per-subscriber and aggregate rates."""
    env = dict(os.environ)
    if curve:
        keys = [[k.decode() for k in generate_curve_keypair()] for _ in range(2)]
        env[KEYS_ENV] = json.dumps(keys)
    else:
        env.pop(KEYS_ENV, None)
    pub = _Child("pub", "tcp://127.0.0.1:*", str(n), "bind", str(subscribers), env=env)
    address = pub.read()["address"]
    subs = [_Child("sub", address, str(n), "connect", "0", env=env) for _ in range(subscribers)]
    for sub in subs:
        sub.read()  # its address: it is up
    results = [sub.read() for sub in subs]
    for child in (pub, *subs):
        child.finish()
    _check(results, n)
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    return {
        "per_sub": statistics.mean(r["rate"] for r in results),
        "aggregate": subscribers * n / span,
    }


def fan_in(n: int, publishers: int) -> dict[str, float]:
    """``publishers`` connect to one bound subscriber and start together; aggregate rate."""
    env = dict(os.environ)
    env.pop(KEYS_ENV, None)
    sub = _Child("sub", "tcp://127.0.0.1:*", str(publishers * n), "bind", "0", env=env)
    address = sub.read()["address"]
    pubs = [_Child("pub", address, str(n), "connect", "1", env=env) for _ in range(publishers)]
    for pub in pubs:
        pub.read()  # connected, subscription in, records built
    for pub in pubs:
        pub.send("go")
    result = sub.read()
    for child in (sub, *pubs):
        child.finish()
    _check([result], publishers * n)
    return {"aggregate": result["rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000, help="per publisher")
    parser.add_argument("--role", nargs=5, metavar=("ROLE", "ADDRESS", "N", "MODE", "COUNT"))
    args = parser.parse_args()
    if args.role:
        role, address, n, mode, count = args.role
        if role == "pub":
            role_pub(address, int(n), mode == "bind", int(count))
        else:
            role_sub(address, int(n), mode == "connect")
        return

    n = args.records
    runs: dict[str, list[dict[str, float]]] = {}
    plan = [
        ("pair", lambda: fan_out(n, 1, curve=False)),
        ("fan-in", lambda: fan_in(n // 2, FAN)),
        ("fan-out", lambda: fan_out(n // 2, FAN, curve=False)),
        ("curve", lambda: fan_out(n, 1, curve=True)),
    ]
    started = time.monotonic()
    for round_ in range(args.rounds):
        for name, run in plan:
            runs.setdefault(name, []).append(run())
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    pair = median("pair", "aggregate")
    fan_in_rate = median("fan-in", "aggregate")
    fan_out_each = median("fan-out", "per_sub")
    fan_out_all = median("fan-out", "aggregate")
    curve = median("curve", "aggregate")
    size = len(CODEC.encode(_records(1)[0])[1])
    print(
        f"\nTopologies over tcp (127.0.0.1), EventRecord of {size} B, one process per role, "
        f"median of {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print(f"{'measure':<56}{'records/s':>14}  vs pair")
    rows = [
        ("single pair, 1 publisher -> 1 subscriber", pair),
        (f"fan-in, {FAN} publishers -> 1 subscriber, aggregate", fan_in_rate),
        (f"fan-out, 1 publisher -> {FAN} subscribers, per subscriber", fan_out_each),
        (f"fan-out, 1 publisher -> {FAN} subscribers, aggregate", fan_out_all),
        ("CURVE pair (allow-list), 1 -> 1", curve),
    ]
    for label, rate in rows:
        print(f"{label:<56}{rate:>14,.0f}  {rate / pair:.2f}x")
    print(f"CURVE cost: CURVE / plain tcp records/s = {curve / pair:.2f}x")
    print(f"(records per publisher: {n:,} in the pair and CURVE runs, {n // 2:,} in fan-in/out;")
    print(f" whole run {time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
