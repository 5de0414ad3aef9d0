"""The publisher's send step and its writer thread.

:class:`SendStep` turns queued entries into messages and hands them to the socket: runs of one
topic, encoded in one call where the codec offers it, numbered per topic. Whoever holds the
publisher's send lock calls it. :class:`Writer` is the thread that sends when the publishing
thread does not: for threads without an event loop, and when an event loop leaves items queued
(it is blocked, or closed).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import math
import operator
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import zmq

from wirebus.codec import MessageCodec, RunEncoding
from wirebus.transport import _wire
from wirebus.transport._base import RateLimitedLog, safe_repr

T = TypeVar("T")

Entry = tuple[bytes, Any]  # (topic, item) with run encoding, else (topic, payload bytes)
_TOPIC = operator.itemgetter(0)
_VALUE = operator.itemgetter(1)
_TICK = 0.02  # s: how often a ticking writer looks for a stalled queue


class SendStep(Generic[T]):
    """Encodes and sends queued entries; every counter of what happened to them.

    ``on_error(exc, item)`` hears of each item that failed to encode (the item is dropped
    alone). An error of the socket loses the rest of the run being sent (counted in ``lost``)
    and is raised; what follows that run stays queued.
    """

    def __init__(
        self,
        socket: zmq.Socket[bytes],
        publisher_id: int,
        codec: MessageCodec[T],
        run_encoding: RunEncoding[T] | None,
        conflate: bool,
        max_batch_bytes: int,
        on_error: Callable[[BaseException, T], None],
        owner: str,
    ) -> None:
        self._socket = socket
        self._publisher_id = publisher_id
        self._codec = codec
        self._encode_run = run_encoding.encode if run_encoding is not None else None
        self._conflate = conflate
        self._max_batch_bytes = max_batch_bytes
        self._on_error = on_error
        self._owner = owner
        self._seqs: dict[bytes, int] = {}
        self._error_log = RateLimitedLog()
        self.sent = 0
        self.messages = 0
        self.conflated = 0
        self.encode_errors = 0
        self.lost = 0
        self.subscriptions = 0

    @property
    def handled(self) -> int:
        """Items whose fate is settled: sent, superseded, failed to encode, or lost."""
        return self.sent + self.conflated + self.encode_errors + self.lost

    def send(self, queue: collections.deque[Entry]) -> None:
        """Send everything in ``queue``, batching runs of one topic (under the send lock)."""
        popleft = queue.popleft
        while queue:
            runs = itertools.groupby(
                itertools.starmap(popleft, itertools.repeat((), len(queue))), _TOPIC
            )
            for topic, run in runs:
                values = list(map(_VALUE, run))
                try:
                    self._send_run(topic, values)
                except Exception:
                    queue.extendleft(reversed([e for _, r in runs for e in r]))
                    raise

    def _send_run(self, topic: bytes, values: list[Any]) -> None:
        superseded = 0
        if self._conflate:
            superseded = len(values) - 1
            values = values[-1:]
        step = _wire.MAX_ITEMS
        for start in range(0, len(values), step):
            chunk = values[start : start + step]
            try:
                if self._encode_run is None:
                    self._send_payloads(topic, chunk, superseded)
                else:
                    self._send_items(topic, chunk, superseded)
            except Exception:
                self.lost += len(values) - start
                raise
            superseded = 0
            if self.messages % 64 == 0:  # a long queue: keep the subscription count current
                self.read_subscriptions()

    def _send_items(self, topic: bytes, items: list[T], superseded: int) -> None:
        """Encode ``items`` in one call and send them in one message (or more, if too big)."""
        assert self._encode_run is not None
        try:
            body = self._encode_run(items)
        except Exception:
            items, body = self._encode_one_by_one(items)
            if not items:
                self._socket_send_nothing(topic, superseded)
                return
        if len(body) > self._max_batch_bytes and len(items) > 1:
            half = len(items) // 2
            self._send_items(topic, items[:half], superseded)
            self._send_items(topic, items[half:], 0)
            return
        count = len(items)
        first = self._seqs.get(topic, 0) + superseded
        self._seqs[topic] = first + count
        self._socket.send(_wire.pack_run(topic, self._publisher_id, first, count, body))
        self.sent += count
        self.conflated += superseded
        self.messages += 1

    def _socket_send_nothing(self, topic: bytes, superseded: int) -> None:
        """Every item of a run failed to encode: only the superseded ones still need counting
        (their sequence numbers are skipped, so subscribers see them as dropped)."""
        self._seqs[topic] = self._seqs.get(topic, 0) + superseded
        self.conflated += superseded

    def _encode_one_by_one(self, items: list[T]) -> tuple[list[T], bytes]:
        """Encode item by item after a run failed: report and drop the ones that fail."""
        good, payloads = [], []
        for item in items:
            try:
                payloads.append(self._codec.encode(item)[1])
            except Exception as exc:
                self.encode_errors += 1
                self._report(exc, item)
                continue
            good.append(item)
        return good, _wire.array_header(len(good)) + b"".join(payloads)

    def _report(self, exc: Exception, item: T) -> None:
        try:
            self._on_error(exc, item)
        except Exception as raised:
            self._error_log(
                logging.ERROR,
                f"{self._owner}: on_error raised {safe_repr(raised)} while handling "
                f"{safe_repr(exc)}",
                raised,
            )

    def _send_payloads(self, topic: bytes, payloads: list[bytes], superseded: int) -> None:
        """Send encoded payloads in table-form messages within ``max_batch_bytes``."""
        start = 0
        while start < len(payloads):
            end = _fit(payloads, start, self._max_batch_bytes)
            count = end - start
            first = self._seqs.get(topic, 0) + superseded
            self._seqs[topic] = first + count
            frame = _wire.pack_table(topic, self._publisher_id, first, payloads[start:end])
            self._socket.send(frame)
            self.sent += count
            self.conflated += superseded
            self.messages += 1
            superseded = 0
            start = end

    def read_subscriptions(self) -> None:
        """Count the subscribe (+1) and unsubscribe (-1) messages waiting on the socket."""
        recv = self._socket.recv
        while True:
            try:
                message = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if message[:1] == b"\x01":
                self.subscriptions += 1
            elif message[:1] == b"\x00":
                self.subscriptions -= 1


def _fit(payloads: list[bytes], start: int, max_bytes: int) -> int:
    """The end of the longest run from ``start`` (at least one payload, at most
    ``MAX_ITEMS``) whose sizes add up to at most ``max_bytes``."""
    size = len(payloads[start])
    end = start + 1
    limit = min(len(payloads), start + _wire.MAX_ITEMS)
    while end < limit:
        size += len(payloads[end])
        if size > max_bytes:
            break
        end += 1
    return end


class Writer:
    """The publisher's writer thread.

    It sleeps until :meth:`want` asks it to send: at once (a flush), or ``after`` a delay (the
    tail of a burst from a thread without an event loop, which that thread sends itself if it
    publishes again first). While :meth:`start_ticking` has it ticking, it also wakes every
    ``_TICK`` s to look for a stalled queue: items queued and nothing sent for a whole tick, as
    when the loop that was to send them is blocked or closed. It takes the send lock only for
    a queue nobody else sends, never on a tick that finds the publishing thread at work: a
    thread that holds the GIL while it busy-waits would otherwise find the lock taken by a
    writer waiting for that GIL. It stops ticking after a tick with nothing queued and nothing
    sent, and then calls ``idle``: a loop that scheduled a send and blocked before it ran must
    not keep the publisher from scheduling anew.
    """

    def __init__(
        self,
        name: str,
        send: Callable[[], None],
        queue: collections.deque[Entry],
        progress: Callable[[], int],
        idle: Callable[[], None],
    ) -> None:
        self._send = send
        self._idle = idle
        self._queue = queue
        self._progress = progress
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wanted = False
        self._wanted_at: float | None = None  # time.monotonic() of a delayed want
        self._sleeping = False
        self._stopping = False
        self.ticking = False
        self._error_log = RateLimitedLog()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def want(self, after: float = 0.0) -> None:
        """Have the writer send the queue, at once or ``after`` seconds from now."""
        if after <= 0:
            self._wanted = True
        elif self._wanted_at is None:
            self._wanted_at = time.monotonic() + after
        self._wake()

    def start_ticking(self) -> None:
        self.ticking = True
        self._wake()

    def stop(self, timeout: float | None) -> bool:
        """End the thread (within ``timeout``); True when it ended. Closes the wake pipe."""
        self._stopping = True
        self._sleeping = True  # wake it whatever it believes
        self._wake()
        self.thread.join(timeout)
        if self.thread.is_alive():
            return False
        os.close(self._wake_r)
        os.close(self._wake_w)
        return True

    def _wake(self) -> None:
        if self._sleeping:
            self._sleeping = False
            with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
                os.write(self._wake_w, b"\0")

    def _sleep(self, poller: select.poll, next_tick: float) -> None:
        """Sleep until woken, the next tick (if ticking) or a delayed want is due."""
        self._sleeping = True
        if not self._wanted:
            wake_at = next_tick if self.ticking else math.inf
            if self._wanted_at is not None:
                wake_at = min(wake_at, self._wanted_at)
            timeout = None
            if wake_at != math.inf:
                timeout = max(0, math.ceil((wake_at - time.monotonic()) * 1000))
            poller.poll(timeout)
            _drain(self._wake_r)
        self._sleeping = False

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        progress_at_tick = -1
        next_tick = time.monotonic() + _TICK
        while True:
            self._sleep(poller, next_tick)
            if self._stopping:
                return
            now = time.monotonic()
            send = self._wanted
            if send:  # cleared only once seen: what was queued before it is sent below
                self._wanted = False
            wanted_at = self._wanted_at
            if wanted_at is not None and now >= wanted_at:
                self._wanted_at = None
                send = True
            ticked = self.ticking and now >= next_tick
            if ticked:
                next_tick = now + _TICK
                moved = self._progress() != progress_at_tick
                send = send or (not moved and bool(self._queue))
            if send:
                try:
                    self._send()
                except Exception as exc:  # the sender logs its own; this is a bug's last net
                    self._error_log(logging.ERROR, f"{self.thread.name}: {safe_repr(exc)}", exc)
            if ticked:
                progress_at_tick = self._progress()
                if not moved and not self._queue:
                    self.ticking = False
                    self._idle()
                    if self._queue:  # queued meanwhile, and its sender may have seen True
                        self.ticking = True
            elif not self.ticking:
                next_tick = now + _TICK


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass
