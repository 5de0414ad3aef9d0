"""The ``wirebus`` command: ``demo``, ``tail``, ``kv show``, ``kv serve``, ``bench``, ``--version``.

Bad input gets one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import importlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, cast

import msgspec

from wirebus import __version__
from wirebus._aio import positive_timeout
from wirebus._endpoint import check_address
from wirebus.codec import MessageCodec, MsgspecCodec, check_codec
from wirebus.errors import KVStoreError, WirebusError
from wirebus.kvstore import KVStoreReader, MetricsServer, SeriesSummary
from wirebus.record import EventRecordCodec
from wirebus.transport import ZmqMessageSubscriber

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
        config = DemoConfig(
            samples=args.samples,
            rate=args.rate,
            out=Path(args.out),
            restart_logger=args.restart_logger,
        )
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
        return 0 if result.ok else 1

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


def _seconds(text: str) -> float:
    """argparse type: a positive, finite number of seconds (``nan`` would wait forever)."""
    try:
        return positive_timeout("seconds", float(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive, finite number of seconds, got {text!r}"
        ) from None


def _count(text: str) -> int:
    """argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _load_codec(spec: str) -> MessageCodec[Any]:
    """``pkg.mod:Name``: a codec class (made with no arguments) or a codec object; the current
    directory is importable, as it is for ``python -m``."""
    module_name, colon, name = spec.partition(":")
    if not colon or not module_name or not name:
        _fail(f"--codec {spec!r}: expected pkg.module:Name", _USAGE_ERROR)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever importing the user's module raised
        _fail(f"--codec {spec!r}: cannot import {module_name!r}: {exc!r}")
    found = getattr(module, name, None)
    if found is None:
        _fail(f"--codec {spec!r}: module {module_name!r} has no {name!r}")
    try:
        codec = found() if isinstance(found, type) else found
        check_codec(codec)
    except Exception as exc:  # the user's constructor, or not a codec at all
        _fail(f"--codec {spec!r}: {exc}")
    return cast("MessageCodec[Any]", codec)


class _RawCodec(MsgspecCodec[Any]):
    """Any msgpack payload, as the value msgspec makes of it (``tail --raw``)."""

    def __init__(self) -> None:
        super().__init__(Any, topic="raw")  # the topic is unused: tail only decodes


def _json_default(obj: Any) -> Any:
    """JSON for what msgpack has and JSON has not: an ext type."""
    if isinstance(obj, msgspec.msgpack.Ext):
        return {"msgpack_ext": obj.code, "data": obj.data}
    raise TypeError(f"cannot show a {type(obj).__name__} as JSON: {obj!r}")


class _TailSubscriber(ZmqMessageSubscriber[Any]):
    """A payload whose codec raises is one line on stderr, not a logged traceback."""

    async def on_error(self, exc: BaseException, payload: bytes | None) -> None:
        size = "a batch" if payload is None else f"a payload of {len(payload)} bytes"
        print(f"wirebus tail: {size} did not decode: {exc}", file=sys.stderr)


def _tail(args: argparse.Namespace) -> int:
    from wirebus.services.metrics_aggregator import MetricsSnapshotCodec

    try:
        check_address(args.address, bind=args.bind)
    except ValueError as exc:
        _fail(str(exc), _USAGE_ERROR)
    codec: MessageCodec[Any]
    what: str | None = None  # the built-in type expected, for a hint when the bus carries another
    if args.codec:
        codec = _load_codec(args.codec)
    elif args.raw:
        codec = _RawCodec()
    elif args.snapshots:
        codec, what = MetricsSnapshotCodec(), "metrics snapshots"
    else:
        codec, what = EventRecordCodec(), "event records"
    topics = [args.topic] if args.topic else [b""]
    encoder = msgspec.json.Encoder(enc_hook=_json_default)

    async def tail() -> int:
        try:
            subscriber = _TailSubscriber(codec, args.address, connect=not args.bind, topics=topics)
        except (ValueError, OSError) as exc:
            _fail(str(exc))
        async with subscriber:
            shown = 0
            said_waiting = said_not_decoding = False
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
                if what and subscriber.stats.decode_errors and not said_not_decoding:
                    print(
                        f"wirebus tail: messages on {args.address} do not decode as {what}: "
                        "--raw shows any msgpack bus, --codec pkg.module:Class decodes your type",
                        file=sys.stderr,
                    )
                    said_not_decoding = True
                try:
                    line = encoder.encode(item)
                except (TypeError, msgspec.EncodeError) as exc:
                    print(f"wirebus tail: {exc}", file=sys.stderr)
                    continue
                sys.stdout.buffer.write(line + b"\n")
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
            if args.prometheus:
                sys.stdout.write(reader.to_prometheus())
                return 0
            if args.watch is None:
                print(_kv_table(reader))
                return 0

            async def watch() -> int:
                while True:
                    sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
                    print(_kv_table(reader), flush=True)
                    await asyncio.sleep(args.watch)  # the refresh period

            return _run(watch())
        except KVStoreError as exc:  # a store that turned out corrupt
            _fail(f"{args.path!r}: {exc}")


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

_BENCH_HELP = (
    "Runs the benchmarks/bench_*.py scripts of a wirebus source checkout (they are not "
    "installed with the package, and need its dev extra: pip install -e '.[dev]'); run it from "
    "the checkout's root or pass --dir."
)


def _bench(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    scripts = sorted(glob.glob(str(directory / "bench_*.py")))
    if not scripts:
        _fail(
            f"no benchmarks (bench_*.py) in {str(directory)!r}: they ship with a wirebus source "
            "checkout, not the package; run from the checkout's root or pass --dir"
        )
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
    parser.add_argument("--version", action="version", version=f"wirebus {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="run a synthetic benchmark end to end")
    demo.add_argument("--samples", type=int, default=1500, help="samples to issue (default 1500)")
    demo.add_argument("--rate", type=float, default=150.0, help="samples per second (default 150)")
    demo.add_argument("--out", default="demo-out", help="output directory (default demo-out)")
    demo.add_argument(
        "--restart-logger",
        action="store_true",
        help="SIGKILL the event logger a third of the way through and start it again",
    )
    demo.set_defaults(run=_demo)

    tail = commands.add_parser(
        "tail",
        help="print the messages of a running bus as JSON lines",
        description="Print the messages of a running bus as JSON lines: event records by "
        "default, or any msgpack bus with --raw, or your own type with --codec.",
    )
    tail.add_argument("address", help="the publisher's address, e.g. ipc:///tmp/x/events.sock")
    tail.add_argument("--topic", help="only this topic (session, sample, error, ...)")
    tail.add_argument("--bind", action="store_true", help="bind and let publishers connect")
    decode = tail.add_mutually_exclusive_group()
    decode.add_argument("--raw", action="store_true", help="any msgpack payload, shown as JSON")
    decode.add_argument("--snapshots", action="store_true", help="decode MetricsSnapshot")
    decode.add_argument(
        "--codec",
        metavar="PKG.MODULE:NAME",
        help="decode with your codec: a class (made with no arguments) or a codec object; "
        "the current directory is importable",
    )
    tail.add_argument("--count", type=_count, help="exit after this many messages")
    tail.add_argument("--timeout", type=_seconds, help="exit 1 when nothing arrives in this many s")
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

    bench = commands.add_parser(
        "bench",
        help="run the benchmarks of a wirebus checkout (what make bench runs)",
        description=_BENCH_HELP,
    )
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
    except BrokenPipeError:  # the reader went away (| head): a quiet exit, as head users expect
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        code = 0
    raise SystemExit(code)


if __name__ == "__main__":
    main()
