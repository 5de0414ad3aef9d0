"""A whole benchmark harness on wirebus: load, services, metrics, report, cleanup.

``python harness.py [--requests N] [--out DIR]``: sends N requests to a simulated model,
records the benchmark's events and its own messages, and prints the latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
from pathlib import Path

from messages import CODEC, Done, HarnessMessage, Request, Response

from wirebus import (
    EventPublisherService,
    KVStoreReader,
    ServiceLauncher,
    ServiceSpec,
    ZmqMessagePublisher,
)
from wirebus.services.event_logger import log_files
from wirebus.services.metrics_aggregator import wait_for_events

HERE = Path(__file__).resolve().parent


async def fake_model(request: Request, events: EventPublisherService, rng: random.Random) -> str:
    """Stands in for the model under test: streams a few chunks after a short wait."""
    events.issued(request.uuid)
    await asyncio.sleep(rng.uniform(0.01, 0.03))  # time to first token
    events.first_chunk(request.uuid)
    for _ in range(3):
        await asyncio.sleep(0.005)
        events.chunk(request.uuid)
    events.complete(request.uuid, n_tokens=request.max_tokens)
    return "ok " * request.max_tokens


async def run_load(
    requests: int, events: EventPublisherService, messages: ZmqMessagePublisher[HarnessMessage]
) -> None:
    rng = random.Random(1)

    async def one(i: int) -> None:
        request = Request(uuid=f"r{i:05d}", prompt=f"question {i}", max_tokens=16)
        messages.publish(request)
        text = await fake_model(request, events, rng)
        messages.publish(Response(request.uuid, text, request.max_tokens))

    events.session_started()
    events.start_tracking()
    await asyncio.gather(*(one(i) for i in range(requests)))
    events.stop_tracking()
    events.session_ended()
    messages.publish(Done(requests))  # the sink's cue that it has every response


async def run(requests: int, out: Path) -> int:
    """Run the benchmark; return the number of events published."""
    # Publishers bind first, on free loopback ports; services connect to `.address`.
    async with (
        ServiceLauncher(log_dir=out / "logs") as launcher,
        EventPublisherService("tcp://127.0.0.1:*") as events,
    ):
        with ZmqMessagePublisher(CODEC, "tcp://127.0.0.1:*") as messages:
            ready = await launcher.start([
                ServiceSpec("event_logger", [
                    sys.executable, "-m", "wirebus.services.event_logger",
                    "--address", events.address, "--out", str(out / "events.jsonl"),
                ]),
                ServiceSpec("metrics_aggregator", [
                    sys.executable, "-m", "wirebus.services.metrics_aggregator",
                    "--address", events.address,
                ]),
                ServiceSpec("sink", [
                    sys.executable, str(HERE / "sink.py"),
                    "--address", messages.address, "--out", str(out / "responses.jsonl"),
                ]),
            ])  # fmt: skip
            # Subscriptions, not subscribers: the logger and the aggregator take every topic
            # (one subscription each); the sink takes "response" and "done" (two).
            await events.wait_for_subscribers(2, timeout=10)
            await messages.wait_for_subscribers(2, timeout=10)

            await run_load(requests, events, messages)

            # Everything published is handed to ZMQ; then wait until the aggregator counted it.
            await events.flush(timeout=10)
            await messages.flush(timeout=10)
            store = ready["metrics_aggregator"].info["kvstore"]
            with KVStoreReader(store) as reader:
                counted = await wait_for_events(reader, events.published, timeout=10)
            if counted != events.published:
                raise RuntimeError(f"the store counted {counted} of {events.published} events")

            # Any other process can read the live store: here, the report script.
            report = await asyncio.create_subprocess_exec(
                sys.executable, str(HERE / "report.py"), store
            )
            if await report.wait() != 0:
                raise RuntimeError(f"report.py {store} exited with {report.returncode}")

            codes = await launcher.stop()  # SIGTERM: each service takes what is on its way
    # Cleaned up: the services stopped (the aggregator removed its store), the publishers
    # closed; on an error too, as the blocks end. What stays is in `out`.
    if codes != {"event_logger": 0, "metrics_aggregator": 0, "sink": 0}:
        raise RuntimeError(f"a service failed: {codes}; see {out / 'logs'}")
    return events.published


def main(requests: int, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in log_files(out / "events.jsonl"):  # the event logger appends
        os.unlink(old)
    published = asyncio.run(run(requests, out))
    logged = sum(len(Path(f).read_bytes().splitlines()) for f in log_files(out / "events.jsonl"))
    responses = len((out / "responses.jsonl").read_bytes().splitlines())
    print(f"events published {published}, logged {logged}; responses recorded {responses}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500, help="requests to send")
    parser.add_argument("--out", type=Path, default=Path("harness-out"), help="output directory")
    args = parser.parse_args()
    main(args.requests, args.out)
