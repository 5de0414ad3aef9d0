"""Event logger: writes every event record as one JSON line.

    python -m wirebus.services.event_logger --address ADDRESS --out PATH [--max-bytes N]

Subscribes to every event at ``ADDRESS`` and appends each record to ``PATH`` as a JSON object
(msgspec's JSON form of :class:`~wirebus.EventRecord`: event types as their strings, ``data``
tagged by ``type``). With ``--max-bytes`` the file is rotated by size: the full file becomes
``PATH.1``, then ``PATH.2``, ... (oldest first) and a new ``PATH`` is started, so the whole log
in order is ``PATH.1 ... PATH.k, PATH``. On SIGTERM it reads what is still on its way, then
flushes and closes the file, so nothing it received is lost. Its ready info carries ``path``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import msgspec

from wirebus.record import EventRecord, EventRecordCodec, SessionEventType
from wirebus.service import ServiceContext, run_service
from wirebus.services import drain
from wirebus.services._base import HandlerSubscriber

__all__ = ["JsonLinesWriter", "log_files"]


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

    def close(self) -> None:
        """Flush and close; idempotent."""
        self._file.close()


def log_files(path: str | os.PathLike[str]) -> list[str]:
    """Every file of the log at ``path``, oldest first (rotated ones, then ``path``)."""
    path = os.fspath(path)
    rotated = []
    k = 1
    while os.path.exists(f"{path}.{k}"):
        rotated.append(f"{path}.{k}")
        k += 1
    return [*rotated, path] if os.path.exists(path) else rotated


async def _serve(service: ServiceContext, args: argparse.Namespace) -> None:
    writer = JsonLinesWriter(args.out, args.max_bytes)
    try:
        events = HandlerSubscriber(EventRecordCodec(), args.address, writer.write)
        try:
            await events.start()
            service.ready({"path": args.out})
            await service.stopped()
            await drain(events)
        finally:
            await events.aclose()
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wirebus.services.event_logger")
    parser.add_argument("--address", required=True, help="the event publisher's address")
    parser.add_argument("--out", required=True, help="the JSON lines file to append to")
    parser.add_argument("--max-bytes", type=int, help="rotate the file at this size")
    args = parser.parse_args(argv)
    if args.max_bytes is not None and args.max_bytes < 1:
        parser.error(f"--max-bytes must be >= 1, got {args.max_bytes}")
    args.out = os.path.abspath(args.out)

    async def serve(service: ServiceContext) -> None:
        await _serve(service, args)

    run_service(serve)


if __name__ == "__main__":
    main()
