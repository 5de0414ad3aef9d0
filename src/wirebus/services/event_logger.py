"""Event logger: writes every event record as one JSON line, exactly once across restarts.

    python -m wirebus.services.event_logger --address ADDRESS --out PATH [--max-bytes N]
        [--history N]

Subscribes to every event at ``ADDRESS`` and appends each record to ``PATH`` as a JSON object
(msgspec's JSON form of :class:`~wirebus.EventRecord`: event types as their strings, ``data``
tagged by ``type``). With ``--max-bytes`` the file is rotated by size: the full file becomes
``PATH.1``, then ``PATH.2``, ... (oldest first) and a new ``PATH`` is started, so the whole log
in order is ``PATH.1 ... PATH.k, PATH``. On SIGTERM it reads what is still on its way, then
flushes and closes the file, so nothing it received is lost. Its ready info carries ``path``.

It survives being killed. Every :data:`CHECKPOINT_INTERVAL` s (and when it stops) it flushes
the file and stores, in ``PATH.position``, how long the log is together with its subscriber's
:attr:`~wirebus.ZmqMessageSubscriber.position`. Started again on the same ``PATH``, it first
cuts the log back to that checkpoint (:func:`restore`), then subscribes with ``recover=True``
and ``resume`` at the stored position (its publishers' replay endpoints stored too, so the
catch-up starts at once): what the killed run wrote after its last checkpoint, and
everything published while no logger ran, is fetched from the publisher's replay buffer
(:class:`~wirebus.services.event_publisher.EventPublisherService` keeps one), so each record is
in the log once. A publisher not in the checkpoint gets ``--history`` items of history
(default :data:`~wirebus.services.event_publisher.REPLAY_ITEMS`). What the replay buffer no
longer held is missing from the log, and counted in the subscriber's ``stats.dropped``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgspec

from wirebus.codec import TOPIC_FRAME_SIZE
from wirebus.record import EventRecord, EventRecordCodec, SessionEventType
from wirebus.service import ServiceContext, run_service
from wirebus.services import drain
from wirebus.services.event_publisher import REPLAY_ITEMS
from wirebus.transport import Position, ZmqMessageSubscriber

__all__ = [
    "CHECKPOINT_INTERVAL",
    "JsonLinesWriter",
    "Resume",
    "checkpoint_path",
    "log_files",
    "restore",
]

CHECKPOINT_INTERVAL = 0.1
"""Seconds between two checkpoints of a running logger: what a restart fetches again at most."""


class _Checkpoint(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The log's extent (``files`` rotated files, then ``size`` bytes of PATH), the position of
    the subscriber that wrote it, as (publisher id, topic, next sequence number), and the
    replay endpoints of those publishers."""

    files: int
    size: int
    position: list[tuple[int, bytes, int]]
    endpoints: dict[int, str] = {}


class Resume(NamedTuple):
    """Where a logger goes on after :func:`restore`: a subscriber's ``resume`` and
    ``resume_endpoints``."""

    position: Position
    endpoints: dict[int, str]


class JsonLinesWriter:
    """Appends records to ``path`` as JSON lines, rotating at ``max_bytes`` when given."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.path = os.fspath(path)
        self._max_bytes = max_bytes
        self._encoder = msgspec.json.Encoder()
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._size = self._file.tell()
        self._rotations = len(log_files(self.path)) - 1
        self.written = 0

    def write(self, records: Sequence[EventRecord]) -> None:
        """Write ``records``, one line each; flushes at the end of a session."""
        data = self._encoder.encode_lines(records)
        self._file.write(data)
        self._size += len(data)
        self.written += len(records)
        if any(r.event_type is SessionEventType.ENDED for r in records):
            self._file.flush()
        if self._max_bytes is not None and self._size >= self._max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self._file.close()
        self._rotations += 1
        os.rename(self.path, f"{self.path}.{self._rotations}")
        self._file = open(self.path, "ab")  # noqa: SIM115
        self._size = 0

    def checkpoint(self, position: Position, endpoints: Mapping[int, str] | None = None) -> None:
        """Flush, then store the log's length with ``position`` (and the publishers' replay
        ``endpoints``) in :func:`checkpoint_path`, replacing the previous checkpoint in one
        step, so a kill leaves one or the other."""
        self._file.flush()
        state = _Checkpoint(
            self._rotations,
            self._size,
            [(p, topic, seq) for (p, topic), seq in position.items()],
            dict(endpoints or {}),
        )
        target = checkpoint_path(self.path)
        with open(f"{target}.tmp", "wb") as f:
            f.write(msgspec.json.encode(state))
        os.replace(f"{target}.tmp", target)

    def close(self) -> None:
        """Flush and close; idempotent."""
        self._file.close()


def checkpoint_path(path: str | os.PathLike[str]) -> str:
    """Where the logger writing ``path`` keeps its checkpoint: ``PATH.position``."""
    return f"{os.fspath(path)}.position"


def restore(path: str | os.PathLike[str]) -> Resume:
    """Cut the log at ``path`` back to its last checkpoint; return the position and replay
    endpoints stored with it.

    Without a checkpoint the log is left as it is and both are empty. Lines written after
    the checkpoint are removed (a file rotated since is put back in its place first): the
    position says they are due again. ``ValueError`` when the checkpoint is unreadable or the
    log is shorter than it says (someone else changed the files): move ``PATH.position`` away
    to start afresh.
    """
    path = os.fspath(path)
    try:
        with open(checkpoint_path(path), "rb") as f:
            state = msgspec.json.decode(f.read(), type=_Checkpoint)
    except FileNotFoundError:
        return Resume({}, {})
    except msgspec.DecodeError as exc:
        raise ValueError(f"the checkpoint {checkpoint_path(path)!r} is unreadable: {exc}") from None
    later = state.files + 1
    if os.path.exists(f"{path}.{later}"):  # rotated after the checkpoint: PATH was that file
        os.replace(f"{path}.{later}", path)
        while os.path.exists(f"{path}.{later + 1}"):
            later += 1
            os.unlink(f"{path}.{later}")
    size = os.path.getsize(path) if os.path.exists(path) else 0
    rotated = len(log_files(path)) - os.path.exists(path)
    if size < state.size or rotated != state.files:
        raise ValueError(
            f"the log {path!r} is {rotated} rotated files and {size} bytes, but its checkpoint "
            f"{checkpoint_path(path)!r} says {state.files} and {state.size} bytes"
        )
    if size > state.size:
        os.truncate(path, state.size)
    position: Position = {}
    for publisher, topic, seq in state.position:
        if len(topic) != TOPIC_FRAME_SIZE:
            raise ValueError(f"the checkpoint {checkpoint_path(path)!r} has a bad topic {topic!r}")
        position[(publisher, topic)] = seq
    return Resume(position, state.endpoints)


def log_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file of the log at ``path``, oldest first (rotated ones, then ``path``)."""
    path = os.fspath(path)
    rotated = []
    k = 1
    while os.path.exists(f"{path}.{k}"):
        rotated.append(f"{path}.{k}")
        k += 1
    return [*rotated, path] if os.path.exists(path) else rotated


class _Logger(ZmqMessageSubscriber[EventRecord]):
    """Writes what it receives; checkpoints every :data:`CHECKPOINT_INTERVAL` s."""

    def __init__(self, writer: JsonLinesWriter, address: str, **options: Any) -> None:
        super().__init__(EventRecordCodec(), address, recover=True, **options)
        self._writer = writer
        self._due = 0.0

    async def process(self, items: list[EventRecord]) -> None:
        self._writer.write(items)
        now = time.monotonic()
        if now >= self._due:
            self._due = now + CHECKPOINT_INTERVAL
            self.checkpoint()

    def checkpoint(self) -> None:
        self._writer.checkpoint(self.position, self.replay_endpoints)


async def _serve(service: ServiceContext, args: argparse.Namespace) -> None:
    resume = restore(args.out)
    writer = JsonLinesWriter(args.out, args.max_bytes)
    try:
        # the log as found is where a kill from now on goes back to
        writer.checkpoint(resume.position, resume.endpoints)
        events = _Logger(
            writer,
            args.address,
            history=args.history,
            resume=resume.position,
            resume_endpoints=resume.endpoints,
        )
        try:
            await events.start()
            service.ready({"path": args.out})
            await service.stopped()
            await drain(events)
            events.checkpoint()
            stats = events.stats
            print(
                f"event_logger: {writer.written} records written to {args.out} "
                f"({stats.recovered} recovered, {stats.dropped} missed)",
                file=sys.stderr,
            )
        finally:
            await events.aclose()
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wirebus.services.event_logger")
    parser.add_argument("--address", required=True, help="the event publisher's address")
    parser.add_argument("--out", required=True, help="the JSON lines file to append to")
    parser.add_argument("--max-bytes", type=int, help="rotate the file at this size")
    parser.add_argument(
        "--history",
        type=int,
        default=REPLAY_ITEMS,
        help="items of history to fetch from a publisher not in the checkpoint",
    )
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error(f"--max-bytes must be >= 1, got {args.max_bytes}")
    if args.history < 0:
        parser.error(f"--history must be >= 0, got {args.history}")
    args.out = os.path.abspath(args.out)

    async def serve(service: ServiceContext) -> None:
        await _serve(service, args)

    run_service(serve)


if __name__ == "__main__":
    main()
