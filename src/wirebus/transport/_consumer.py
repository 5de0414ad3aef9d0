"""How a subscriber's frames become :meth:`process` calls: batches of decoded items, the
consumer's first step run inside the reader's own callback (a task only once it has to wait),
and the same delivery in the caller's thread for :meth:`receive_blocking`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Coroutine, Generator, Iterator
from typing import Any, TypeVar

import zmq

from wirebus.transport import _wire
from wirebus.transport._base import MessageSubscriber, safe_repr
from wirebus.transport._decoder import Failure, FrameDecoder, SubscriberStats
from wirebus.transport._recovery import Recovery
from wirebus.transport._watch import ConnectionWatch

T = TypeVar("T")

MAX_BUFFERED_FRAMES = 4096
"""Frames a subscriber takes from its socket ahead of its consumer; then it stops reading."""
# Items decoded per process() call. Larger batches are slower, not faster: every item of a
# batch is alive at once, and the cyclic GC's young-generation passes walk them all.
_ITEMS_PER_BATCH = 256


class Consumer(MessageSubscriber[T]):
    """The delivering half of :class:`~wirebus.ZmqMessageSubscriber`: what it reads is put in
    ``_frames`` (``_newest`` when it conflates), and this hands it to :meth:`process`."""

    def __init__(self, *, conflate: bool) -> None:
        super().__init__(conflate=conflate)
        self._frames: collections.deque[bytes] = collections.deque()
        self._newest: dict[bytes, bytes] = {}  # conflate: publisher id -> its newest frame
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocking = False  # receive_blocking() reads: no event loop may
        self._task: asyncio.Task[None] | None = None  # the consumer, once it had to wait
        self._consuming = False
        self._reading = False

    # What the subscriber provides: its counters, decoder, recovery, socket and its watch.
    stats: SubscriberStats
    _decoder: FrameDecoder[T]
    _recovery: Recovery[T] | None
    _socket: zmq.Socket[bytes]
    _watch: ConnectionWatch

    def _resume_reading(self) -> None:
        raise NotImplementedError

    # -- the consumer ------------------------------------------------------------------------

    def _kick(self) -> None:
        """Replies to deliver or a recovery to end: run the consumer if it is idle."""
        if not self._consuming and not self._closed:
            self._start_consumer()

    def _start_consumer(self) -> None:
        """Run the consumer's first step in the reader callback itself.

        Usually :meth:`_consume` delivers the frames and returns without waiting, and the items
        reach :meth:`process` without a trip through the event loop. If it has to wait, a task
        carries on from where it stopped.
        """
        assert self._loop is not None
        self._consuming = True
        consumer = self._consume()
        try:
            awaited = consumer.send(None)
        except StopIteration:
            return
        self._task = self._loop.create_task(
            _carry_on(consumer, awaited), name=f"wirebus consumer {self!r}"
        )

    async def _consume(self) -> None:
        """Decode and deliver the buffered frames, batch by batch, until none are left."""
        try:
            while self._frames or self._newest or self._recovery_due():
                await self._deliver_batch()
                if not self._reading:
                    self._resume_reading()
                if self._frames or self._newest or self._recovery_due():
                    await asyncio.sleep(0)  # let the reader and other tasks run between batches
        finally:
            self._consuming = False

    async def _deliver_batch(self) -> None:
        """Decode about ``_ITEMS_PER_BATCH`` payloads (decoded or not, so a flood of bad ones
        yields as often) and hand them to :meth:`process`; report what failed."""
        items: list[T] = []
        failures: list[Failure] = []
        if self._conflate:
            newest = list(self._newest.values())
            self._newest.clear()
            for frame in newest:
                self._decoder.decode(frame, items, failures)
        elif self._recovery is not None:
            frames, stats, route = self._frames, self.stats, self._recovery.route
            self._recovery.deliver(items, failures, frames, _ITEMS_PER_BATCH)
            end = stats.received + stats.malformed + _ITEMS_PER_BATCH - len(items)
            while frames and stats.received + stats.malformed < end:
                frame = frames.popleft()
                if not route(frame):
                    self._decoder.decode(frame, items, failures)
        else:
            frames, stats = self._frames, self.stats
            end = stats.received + stats.malformed + _ITEMS_PER_BATCH
            while frames and stats.received + stats.malformed < end:
                self._decoder.decode(frames.popleft(), items, failures)
        for exc, payload in failures:
            await self._report(exc, payload)
        if items:
            try:
                await self.process(items)
            except Exception as exc:
                self.stats.process_errors += 1
                await self._report(exc, None)

    def _recovery_due(self) -> bool:
        return self._recovery is not None and self._recovery.due

    async def _report(self, exc: BaseException, payload: bytes | None) -> None:
        try:
            await self.on_error(exc, payload)
        except Exception as raised:
            self._error_log(
                logging.ERROR,
                f"{safe_repr(self)}: on_error raised {safe_repr(raised)} while handling "
                f"{safe_repr(exc)}",
                raised,
            )

    # -- without an event loop ---------------------------------------------------------------

    def receive_blocking(self, timeout: float | None = None) -> T:
        """The next item, read in the calling thread: for code without an event loop.

        ``TimeoutError`` when none arrives within ``timeout`` seconds (``None``: wait for
        ever). :meth:`process` and :meth:`on_error` run in this thread too, so they must not
        await anything. A subscriber read this way cannot also be started in an event loop.
        """
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        if self._started:
            raise RuntimeError(f"{self!r} runs in an event loop: use 'await receive()'")
        if self._recovery is not None:
            raise RuntimeError(f"{self!r} recovers missed items, which needs an event loop")
        self._blocking = True
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._watch.monitor, zmq.POLLIN)
        while not self._received:
            wake_at = min(t for t in (deadline, self._watch.due, math.inf) if t is not None)
            wait_ms = (
                None
                if wake_at == math.inf
                else max(0, int((wake_at - time.monotonic()) * 1000) + 1)
            )
            ready = dict(poller.poll(wait_ms))
            if self._watch.monitor in ready:
                self._watch.read()
            else:
                self._watch.reconnect_if_due()
            if self._socket in ready:
                self._read_blocking()
            if not self._received and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self!r}: nothing arrived within {timeout} s")
        return self._received.popleft()

    def iter_blocking(self, timeout: float | None = None) -> Iterator[T]:
        """Items as :meth:`receive_blocking` returns them, each within ``timeout``."""
        while True:
            yield self.receive_blocking(timeout)

    def _read_blocking(self) -> None:
        """Read what is there, at most a buffer's worth (under a flood the socket is never
        empty, and the caller's timeout must still be looked at), and deliver it."""
        recv = self._socket.recv
        try:
            for _ in range(MAX_BUFFERED_FRAMES):
                frame = recv(zmq.NOBLOCK)
                if self._conflate:
                    self._newest[frame[_wire.PUBLISHER_ID]] = frame
                else:
                    self._frames.append(frame)
        except zmq.Again:
            pass
        while self._frames or self._newest:
            _run_now(self._deliver_batch(), self)


def _run_now(coroutine: Coroutine[Any, Any, None], owner: object) -> None:
    """Run ``coroutine`` to its end without an event loop; it must not wait on anything."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    coroutine.close()
    raise RuntimeError(
        f"{safe_repr(owner)}: process() or on_error() awaited something during "
        "receive_blocking(); use an event loop ('async with' and 'await receive()')"
    )


async def _carry_on(coroutine: Coroutine[Any, Any, None], awaited: Any) -> None:
    """Go on running ``coroutine``, already started and now waiting on ``awaited``, in a task.

    A task can only start a coroutine from its beginning, so this hands on, unchanged, what
    the coroutine waits on and what the task sends or throws back (cancellation included).
    """
    await _Started(coroutine, awaited)


class _Started:
    __slots__ = ("awaited", "coroutine")

    def __init__(self, coroutine: Coroutine[Any, Any, None], awaited: Any) -> None:
        self.coroutine = coroutine
        self.awaited = awaited

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, awaited = self.coroutine, self.awaited
        while True:
            try:
                sent = yield awaited
            except BaseException as exc:
                try:
                    awaited = coroutine.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    awaited = coroutine.send(sent)
                except StopIteration:
                    return
