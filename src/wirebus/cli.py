"""The ``wirebus`` command: ``demo``, ``tail``, ``kv show``, ``kv serve`` and ``bench``.

Bad input gets one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import msgspec

from wirebus._endpoint import check_address
from wirebus.errors import KVStoreError, WirebusError
from wirebus.kvstore import KVStoreReader, MetricsServer, SeriesSummary
from wirebus.record import EventRecordCodec

__all__ = ["main"]

_USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(_USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


class _Failure(Exception):
    """Ends the command with one line on stderr and ``code``; raised anywhere, even in a loop."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _fail(message: str, code: int = 1) -> NoReturn:
    raise _Failure(message, code)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro``; SIGINT, SIGTERM or SIGHUP cancels it (so its cleanup runs): exit 130."""

    async def guarded() -> int:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            print("wirebus: interrupted", file=sys.stderr)
            return 130
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    return asyncio.run(guarded())


# -- demo ------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from wirebus.demo import DemoConfig, run_demo, summary_lines, write_summary

    try:
        config = DemoConfig(samples=args.samples, rate=args.rate, out=Path(args.out))
    except ValueError as exc:
        _fail(f"--{str(exc).split()[0]}: {exc}", _USAGE_ERROR)

    async def demo() -> int:
        with _live_view(config.samples) as view:
            try:
                result = await run_demo(config, view)
            except (ValueError, WirebusError) as exc:
                _fail(str(exc))
        for line in summary_lines(result):
            print(line)
        write_summary(result, config.out)
        print(f"log, service logs and summary.json in {config.out}/")
        return 0 if result.lost == 0 else 1

    return _run(demo())


@contextlib.contextmanager
def _live_view(total: int) -> Any:
    """A refreshing rich view on a terminal when rich is installed; plain lines otherwise."""
    from wirebus.demo import plain_view, progress_line

    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        yield plain_view(sys.stdout, total)
        return
    if not sys.stdout.isatty():
        yield plain_view(sys.stdout, total)
        return
    with Live(console=Console(), refresh_per_second=4, transient=False) as live:
        yield lambda snapshot: live.update(_live_table(snapshot, total, progress_line))


def _live_table(snapshot: Any, total: int, fallback: Callable[[Any, int], str]) -> Any:
    """The terminal view: a progress bar and the headline metrics of the newest snapshot."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    if snapshot is None:
        return fallback(snapshot, total)
    v, s = snapshot.values, snapshot.series
    done = int(v.get("samples_completed", 0) + v.get("samples_failed", 0))
    table = Table.grid(padding=(0, 2))
    table.add_row("wirebus demo", f"{v.get('elapsed_s', 0.0):.1f} s")
    table.add_row(ProgressBar(total=total, completed=done, width=40), f"{done}/{total} done")
    table.add_row(
        "issued / failed / in flight",
        f"{int(v.get('samples_issued', 0))} / {int(v.get('samples_failed', 0))}"
        f" / {int(v.get('in_flight', 0))}",
    )
    table.add_row(
        "throughput (tracked)",
        f"{v.get('perf_samples_per_s', 0.0):.1f} samples/s, "
        f"{v.get('perf_output_tokens_per_s', 0.0):,.0f} tokens/s",
    )
    for name in ("ttft_ms", "latency_ms", "tpot_ms"):
        st = s.get(name)
        if st is not None and st.count:
            table.add_row(name, f"p50 {st.p50:.1f}  p90 {st.p90:.1f}  p99 {st.p99:.1f}")
    return table


# -- tail ------------------------------------------------------------------------------------


def _tail(args: argparse.Namespace) -> int:
    from wirebus.services.metrics_aggregator import MetricsSnapshotCodec
    from wirebus.transport import ZmqMessageSubscriber

    try:
        check_address(args.address, bind=args.bind)
    except ValueError as exc:
        _fail(str(exc), _USAGE_ERROR)
    codec: Any = MetricsSnapshotCodec() if args.snapshots else EventRecordCodec()
    topics = [args.topic] if args.topic else [b""]
    encoder = msgspec.json.Encoder()

    async def tail() -> int:
        try:
            subscriber = ZmqMessageSubscriber(
                codec, args.address, connect=not args.bind, topics=topics
            )
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        async with subscriber:
            shown = 0
            said_waiting = False
            deadline = None if args.timeout is None else time.monotonic() + args.timeout
            while args.count is None or shown < args.count:
                try:
                    item = await subscriber.receive(timeout=1.0)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        _fail(f"nothing received from {args.address} in {args.timeout} s")
                    if not said_waiting and shown == 0:
                        print(
                            f"wirebus tail: waiting for records on {args.address} ...",
                            file=sys.stderr,
                        )
                        said_waiting = True
                    continue
                sys.stdout.buffer.write(encoder.encode(item) + b"\n")
                sys.stdout.flush()
                shown += 1
        return 0

    return _run(tail())


# -- kv --------------------------------------------------------------------------------------


def _kv_show(args: argparse.Namespace) -> int:
    try:
        reader = KVStoreReader(args.path)
    except (WirebusError, OSError, ValueError) as exc:
        _fail(f"cannot open {args.path!r} as a KV store: {exc}")
    with reader:
        try:
            if args.prometheus or args.watch is None:
                _emit(reader.to_prometheus() if args.prometheus else _kv_table(reader) + "\n")
                return 0

            async def watch() -> int:
                while True:
                    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
                    if not _emit(clear + _kv_table(reader) + "\n"):
                        return 0  # the reader of the pipe is gone: done, quietly
                    await asyncio.sleep(args.watch)  # the refresh period

            return _run(watch())
        except KVStoreError as exc:
            _fail(f"{args.path!r}: {exc}")


def _emit(text: str) -> bool:
    """Write ``text`` to stdout; False when the pipe's reader has gone (``| head``).

    Then stdout is pointed at /dev/null, so the flush at exit does not fail again.
    """
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return False
    return True


def _watch_period(text: str) -> float:
    """``--watch``: a refresh period in seconds, positive and finite."""
    try:
        period = float(text)
    except ValueError:
        period = math.nan
    if not 0.0 < period < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return period


def _kv_serve(args: argparse.Namespace) -> int:
    try:
        server = MetricsServer(args.path, host=args.host, port=args.port, prefix=args.prefix)
    except (WirebusError, OSError, ValueError) as exc:
        _fail(f"cannot serve {args.path!r}: {exc}")

    async def serve() -> int:
        await asyncio.Event().wait()  # until SIGINT, SIGTERM or SIGHUP
        return 0

    with server:
        print(f"serving {args.path} on {server.url}", flush=True)
        return _run(serve())


def _port(text: str) -> int:
    """``--port``: a TCP port number, 0 for any free one."""
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text}")
    return int(text)


def _kv_table(reader: KVStoreReader) -> str:
    header = ("name", "value / count", "mean", "p50", "p90", "p99", "max")
    rows = [f"{header[0]:<28}{header[1]:>14}" + "".join(f"{h:>11}" for h in header[2:])]
    for name, value in sorted(reader.snapshot().items()):
        if isinstance(value, SeriesSummary):
            stats = (value.mean, value.p50, value.p90, value.p99, value.max)
            rows.append(f"{name:<28}{value.count:>14}" + "".join(f"{s:>11.4g}" for s in stats))
        else:
            rows.append(f"{name:<28}{value:>14.6g}")
    return "\n".join(rows)


# -- bench -----------------------------------------------------------------------------------


def _bench(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    scripts = sorted(glob.glob(str(directory / "bench_*.py")))
    if not scripts:
        _fail(f"no benchmarks (bench_*.py) in {str(directory)!r}: run from a wirebus checkout")
    failed = 0
    for script in scripts:
        if args.only and args.only not in os.path.basename(script):
            continue
        print(f"== {script}", flush=True)
        failed += subprocess.run([sys.executable, script], check=False).returncode != 0
    return 1 if failed else 0


# -- entry point -----------------------------------------------------------------------------


def _parser() -> _Parser:
    parser = _Parser(prog="wirebus", description="Typed ZMQ messages and live metrics.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="run a synthetic benchmark end to end")
    demo.add_argument("--samples", type=int, default=1500, help="samples to issue (default 1500)")
    demo.add_argument("--rate", type=float, default=150.0, help="samples per second (default 150)")
    demo.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    demo.set_defaults(run=_demo)

    tail = commands.add_parser("tail", help="print records from a running bus as JSON lines")
    tail.add_argument("address", help="the publisher's address, e.g. ipc:///tmp/x/events.sock")
    tail.add_argument("--topic", help="only this topic (session, sample, error, ...)")
    tail.add_argument("--bind", action="store_true", help="bind and let publishers connect")
    tail.add_argument("--snapshots", action="store_true", help="decode MetricsSnapshot, not events")
    tail.add_argument("--count", type=int, help="exit after this many records")
    tail.add_argument("--timeout", type=float, help="exit 1 when nothing arrives in this many s")
    tail.set_defaults(run=_tail)

    kv = commands.add_parser("kv", help="key-value store tools")
    kv_commands = kv.add_subparsers(dest="kv_command", required=True, parser_class=_Parser)
    show = kv_commands.add_parser("show", help="show a store's metrics")
    show.add_argument("path", help="the store's path")
    show.add_argument("--watch", type=_watch_period, nargs="?", const=1.0, help="refresh every N s")
    show.add_argument("--prometheus", action="store_true", help="Prometheus text exposition")
    show.set_defaults(run=_kv_show)
    serve = kv_commands.add_parser("serve", help="serve a store's metrics to Prometheus (HTTP)")
    serve.add_argument("path", help="the store's path")
    serve.add_argument("--port", type=_port, default=9464, help="TCP port (default 9464; 0: any)")
    serve.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    serve.add_argument("--prefix", default="", help="put before every metric name")
    serve.set_defaults(run=_kv_serve)

    bench = commands.add_parser("bench", help="run the benchmarks (what make bench runs)")
    bench.add_argument("--dir", default="benchmarks", help="the benchmarks directory")
    bench.add_argument("--only", help="run only benchmarks whose file name contains this")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``wirebus`` console script."""
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        code = run(args)
    except _Failure as failure:
        print(f"wirebus: error: {failure}", file=sys.stderr)
        code = failure.code
    raise SystemExit(code)


if __name__ == "__main__":
    main()
