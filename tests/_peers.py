"""Peer processes for the transport tests: ``python tests/_peers.py ROLE ADDRESS ...``.

publish ADDRESS N bind|connect
    wait for one subscriber, publish N EventRecords (timestamp_ns = 0..N-1, sample topic) as
    fast as possible, then close (which delivers what is pending).

Also :class:`Peer`, the test-side handle on such a peer process (used by the topology and
network-namespace tests), and :func:`build_frame` / :func:`parse_frame`, the wire format written
by hand from docs/wire-format.md, as a raw pyzmq peer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from wirebus import TOPIC_FRAME_SIZE, EventRecord, EventRecordCodec, SampleEventType
from wirebus.transport import ZmqMessagePublisher


class Peer:
    """A peer process that prints JSON lines; ``state`` merges every line it printed so far.

    ``prefix`` goes before the command (e.g. ``ip netns exec NS``). ``send`` writes a line to
    its stdin. ``close`` kills it if it still runs and reaps it.
    """

    def __init__(self, script: str, *args: str, prefix: Sequence[str] = ()) -> None:
        command = [*prefix, sys.executable, script, *args]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.state: dict[str, Any] = {}
        self._stderr: list[str] = []
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.state = {**self.state, **json.loads(line)}

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    async def wait_for(self, condition: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.state):
            if self.proc.poll() is not None:
                await asyncio.to_thread(self._threads[0].join, 5)  # its last lines
                if condition(self.state):
                    return
                raise AssertionError(f"peer exited {self.proc.returncode}: {self.describe()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s: {self.describe()}")
            await asyncio.sleep(0.01)  # polling another process's reports, with a deadline

    async def finish(self, timeout: float = 15) -> dict[str, Any]:
        """Wait for a clean exit; the merged state of everything it printed."""
        code = await asyncio.to_thread(self.proc.wait, timeout)
        await asyncio.to_thread(self._threads[0].join, 5)
        assert code == 0, self.describe()
        return self.state

    def describe(self) -> str:
        return f"state={self.state} stderr={''.join(self._stderr)[-3000:]!r}"

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


def stdin_says_stop() -> threading.Event:
    """For a peer process: an event set when its test writes ``stop`` (or closes stdin)."""
    stop = threading.Event()

    def watch() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        stop.set()

    threading.Thread(target=watch, daemon=True).start()
    return stop


# The oracle: the wire format written by hand from docs/wire-format.md, independent of
# wirebus.transport._wire on purpose (its numbers are the document's, not imported), so that a
# change to the library's encoder that breaks the documented format fails the tests.
_VERSION = 2
_FLAG_RUN = 0x01
_FLAG_REPLAY = 0x02


def _msgpack_array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


def build_frame(
    topic: bytes,
    publisher_id: int,
    first_seq: int,
    payloads: list[bytes],
    *,
    run: bool = False,
    version: int = _VERSION,
    replay: bytes = b"",
) -> bytes:
    """Build one message exactly as docs/wire-format.md describes, by hand: the table form,
    or with ``run`` the run form (one msgpack array of the payloads); ``replay`` announces a
    replay endpoint."""
    flags = (_FLAG_RUN if run else 0) | (_FLAG_REPLAY if replay else 0)
    header = (
        bytes([version, flags])
        + (0).to_bytes(2, "little")
        + len(payloads).to_bytes(4, "little")
        + publisher_id.to_bytes(8, "little")
        + first_seq.to_bytes(8, "little")
    )
    if replay:
        header += len(replay).to_bytes(2, "little") + replay
    if run:
        return topic + header + _msgpack_array_header(len(payloads)) + b"".join(payloads)
    lengths = b"".join(len(p).to_bytes(4, "little") for p in payloads)
    return topic + header + lengths + b"".join(payloads)


def parse_frame(frame: bytes) -> tuple[bytes, int, int, list[bytes]]:
    """Parse one message exactly as docs/wire-format.md describes, by hand (either form); a
    replay endpoint, if announced, is skipped (:func:`announced_endpoint` reads it)."""
    topic, rest = frame[:TOPIC_FRAME_SIZE], frame[TOPIC_FRAME_SIZE:]
    assert rest[0] in (1, _VERSION), rest[0]
    if rest[1] & _FLAG_REPLAY:
        length = int.from_bytes(rest[24:26], "little")
        rest = rest[:24] + rest[26 + length :]
    count = int.from_bytes(rest[4:8], "little")
    publisher_id = int.from_bytes(rest[8:16], "little")
    first_seq = int.from_bytes(rest[16:24], "little")
    if rest[1] & _FLAG_RUN:
        elements = msgspec.msgpack.decode(rest[24:], type=list[msgspec.Raw])
        assert len(elements) == count
        return topic, publisher_id, first_seq, [bytes(e) for e in elements]
    lengths = [int.from_bytes(rest[24 + 4 * i : 28 + 4 * i], "little") for i in range(count)]
    offset, payloads = 24 + 4 * count, []
    for length in lengths:
        payloads.append(rest[offset : offset + length])
        offset += length
    assert offset == len(rest)
    return topic, publisher_id, first_seq, payloads


def announced_endpoint(frame: bytes) -> bytes:
    """The replay endpoint a message announces (docs/wire-format.md), or ``b""``."""
    rest = frame[TOPIC_FRAME_SIZE:]
    if not rest[1] & _FLAG_REPLAY:
        return b""
    length = int.from_bytes(rest[24:26], "little")
    return rest[26 : 26 + length]


def _records(n: int) -> list[EventRecord]:
    return [
        EventRecord(SampleEventType.ISSUED, timestamp_ns=i, sample_uuid=f"{i:016x}")
        for i in range(n)
    ]


async def _publish(address: str, n: int, bind: bool) -> None:
    with ZmqMessagePublisher(EventRecordCodec(), address, bind=bind) as publisher:
        await publisher.wait_for_subscribers(1, timeout=20)
        for record in _records(n):
            publisher.publish(record)


def main(argv: list[str]) -> None:
    role, address, n, mode = argv[0], argv[1], int(argv[2]), argv[3]
    assert role == "publish", role
    asyncio.run(_publish(address, n, bind=mode == "bind"))


if __name__ == "__main__":
    main(sys.argv[1:])
