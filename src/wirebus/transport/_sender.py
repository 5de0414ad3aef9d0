"""Who sends: the publisher's :class:`Dispatcher` and its :class:`Writer` thread.

Inside a running event loop, the loop sends: an idle item at once, the rest of a loop turn
together from one ``call_soon`` callback, and inline whenever a full message's worth is queued.
A thread without an event loop sends an item at once when it publishes after a pause; a burst
it batches itself, and the writer sends the burst's tail if the thread does not come back for
it. The writer also sends what a blocked or closed loop leaves queued. How a run becomes a
message is :mod:`~wirebus.transport._sendstep`'s business.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any

from wirebus import _aio
from wirebus.transport._base import LastOneOut, RateLimitedLog, logger, safe_repr
from wirebus.transport._intake import Entry
from wirebus.transport._sendstep import SendStep

_TICK = 0.02  # s: how often a ticking writer looks for a stalled queue


# A thread without an event loop is in a burst when it publishes within this many seconds of
# its last send: the writer batches what follows, unless it is slower than this to come.
_BURST_GAP = 50e-6
# How long the writer leaves the tail of a loop-less burst to the publishing thread (s).
_WRITER_DELAY = 0.001


class _Due(enum.Enum):
    """Who is due to send what ``publish()`` queued (beyond a full message, sent at once)."""

    NOBODY = "nobody"
    LOOP = "the publishing event loop, from a call_soon callback"
    WRITER = "the writer thread, woken for a thread without an event loop"


LOOP = _Due.LOOP


class Writer:
    """The publisher's writer thread.

    It sleeps until :meth:`want` asks it to send: at once (a flush), or ``after`` a delay (the
    tail of a burst from a thread without an event loop, which that thread sends itself if it
    publishes again first). While :meth:`start_ticking` has it ticking (items wait for a loop's
    callback), it also wakes every ``_TICK`` s to look for a stalled queue: items queued and
    nothing sent for a whole tick, as when the loop that was to send them is blocked or closed.
    It takes the send lock only for a queue nobody else sends, never on a tick that finds the
    publishing thread at work: a thread that holds the GIL while it busy-waits would otherwise
    find the lock taken by a writer waiting for that GIL. It stops ticking at a tick that finds
    nothing queued, and then calls ``idle``: a loop that scheduled a send and blocked before it
    ran must not keep the publisher from scheduling anew.
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
        self._last_one_out = LastOneOut(self._close_pipe)
        self.thread = threading.Thread(
            target=self._last_one_out.run, args=(self._serve,), name=name, daemon=True
        )
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
        """End the thread (within ``timeout``); True when it ended. The wake pipe is closed
        now, or by the thread as it ends if it did not end in time."""
        self._stopping = True
        self._sleeping = True  # wake it whatever it believes
        self._wake()
        self.thread.join(timeout)
        return self._last_one_out.stopper_waited()

    def _close_pipe(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

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

    def _serve(self) -> None:
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
                if not self._queue:  # nothing waits for a loop's callback: no need to tick
                    self.ticking = False
                    self._idle()
                    if self._queue:  # queued meanwhile, and its sender may have seen True
                        self.ticking = True
            elif not self.ticking:
                next_tick = now + _TICK


def time_left(deadline: float | None) -> float | None:
    """Seconds until ``deadline`` (``time.monotonic()``), 0 once past; None without one."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _drain(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        while os.read(fd, 4096):
            pass


class Dispatcher:
    """Who sends what ``publish()`` queued: the half of a publisher that owns the queue, the
    send lock (and so the socket: sending, reading subscriptions, flushing), the writer thread
    and the send step.

    The publisher's ``publish()`` appends ``(topic, item)`` entries to :attr:`_queue` and
    calls :meth:`_send_now` (a full message queued) or :meth:`_schedule` (nobody due yet).
    Whoever holds the send lock sends until the queue is empty, and after releasing it looks
    at the queue again, so nothing is ever left behind by a lock another thread held.
    :meth:`_stop_sending` ends it all, for the publisher's ``close()``.
    """

    def _start_dispatch(self, step: SendStep[Any], name: str) -> None:
        self._queue: collections.deque[Entry] = collections.deque()
        self._step = step
        # Whoever holds the send lock owns the socket: it sends and reads subscriptions.
        self._send_lock = threading.Lock()
        self._due = _Due.NOBODY
        self._deferred_at = 0.0  # when the writer was last woken for a loop-less burst
        self._last_inline = 0.0  # when a loop-less publish() last sent at once
        self._flush_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._sending_thread: int | None = None  # who holds the send lock to send, if anyone
        self._handed_close = False  # close() gave up waiting: the sender closes the socket
        self._writer = Writer(
            name, self._send_from_writer, self._queue, lambda: step.messages, self._forget_schedule
        )

    # What the publisher provides: its life, what publish() accepted, what a failure does.
    _published: int

    def _socket_closed(self) -> bool:
        raise NotImplementedError

    def _closing(self) -> bool:
        raise NotImplementedError

    def _refusing(self) -> bool:
        raise NotImplementedError

    def _refusal(self, what: str) -> RuntimeError:
        raise NotImplementedError

    def _send_failed(self, exc: Exception) -> None:
        raise NotImplementedError

    def _close_socket(self, linger: int) -> None:
        raise NotImplementedError

    def _schedule(self) -> None:
        """Have the queue sent soon: by the caller's event loop if it has one; else at once
        after a pause, or by the writer during a burst (or by this thread, should the writer
        be slower than ``_BURST_GAP`` to come, as when this thread holds the GIL)."""
        if self._due is _Due.WRITER:
            now = time.perf_counter()
            if now - self._deferred_at > _BURST_GAP:
                self._deferred_at = now
                self._send_now()
            return
        loop = asyncio._get_running_loop()
        if loop is not None:
            self._due = LOOP
            loop.call_soon(self._send_scheduled)
            if len(self._queue) == 1:  # idle: send this one now, batch the rest of this turn
                self._send_now()
            if self._queue:
                self._wait_for_the_loop()
            return
        now = time.perf_counter()
        if len(self._queue) == 1 and now - self._last_inline > _BURST_GAP:
            self._last_inline = now
            self._send_now()
        else:  # a burst: batched by this thread's next publish() or, failing that, the writer
            self._due = _Due.WRITER
            self._deferred_at = now
            self._writer.want(after=_WRITER_DELAY)

    def _wait_for_the_loop(self) -> None:
        """Items wait for the loop's callback: have the writer tick, so that it sends them
        should the loop block or close first. It stops at a tick that finds nothing queued,
        so a loop that sends every item at once (a paced publisher) never has it tick, and
        never has it compete for the GIL with a publishing thread that busy-waits."""
        if not self._writer.ticking:
            self._writer.start_ticking()

    def _forget_schedule(self) -> None:
        self._due = _Due.NOBODY

    def _send_scheduled(self) -> None:
        self._due = _Due.NOBODY
        self._send_now()

    def _send_from_writer(self) -> None:
        self._due = _Due.NOBODY  # a loop's callback may never run: the next publish schedules
        if self._queue or self._flush_waiters:
            with self._send_lock:
                self._send_locked()
            self._send_now()

    def _send_now(self) -> None:
        """Send the queue from this thread unless another holds the send lock; that one looks
        at the queue again once it has released the lock, so nothing is left behind."""
        queue, lock = self._queue, self._send_lock
        while queue and lock.acquire(blocking=False):
            try:
                if self._socket_closed():  # published while close() ran: never sent
                    return
                self._send_locked()
            finally:
                lock.release()
        if self._handed_close:
            self._close_handed()

    def _send_locked(self, deadline: float | None = None) -> None:
        """Send the queue (under the send lock), or until ``deadline`` (``time.monotonic()``)."""
        if self._socket_closed():
            return
        queue = self._queue
        self._sending_thread = threading.get_ident()
        try:
            while queue and (deadline is None or time.monotonic() < deadline):
                try:
                    self._step.send(queue, deadline)
                except Exception as exc:
                    self._send_failed(exc)
        finally:
            self._sending_thread = None
        if self._flush_waiters:
            self._settle_flushes()

    def _close_handed(self, wait: bool = True) -> None:
        """Close the socket for a ``close()`` that could not wait for a send under way: by
        the sender once it is done, or by ``close()`` itself should the sender already be."""
        if not self._send_lock.acquire(blocking=wait):
            return
        try:
            if self._handed_close and not self._socket_closed():
                self._close_socket(0)
            self._handed_close = False
        finally:
            self._send_lock.release()

    def _stop_sending(self, deadline: float | None, linger: int) -> None:
        """Stop the writer, send what is queued (until ``deadline``, ``time.monotonic()``),
        close the socket delivering for up to ``linger`` ms (no longer than the deadline
        leaves); or, should a send under way outlive the deadline, hand the close to it."""
        if not self._writer.stop(time_left(deadline)):
            logger.warning("%s: the writer thread ends after close()", safe_repr(self))
        left = time_left(deadline)
        if not self._send_lock.acquire(timeout=-1 if left is None else left):
            self._handed_close = True  # the thread sending now closes the socket after
            self._close_handed(wait=False)  # unless it finished meanwhile
            logger.warning("%s: a send outlived close()'s timeout", safe_repr(self))
            return
        try:
            self._send_locked(deadline)
            if self._queue:
                logger.warning("%s: %d item(s) not sent", safe_repr(self), len(self._queue))
            left = time_left(deadline)
            if left is not None:
                budget = int(left * 1000)
                linger = budget if linger < 0 else min(linger, budget)
            self._close_socket(linger)
        finally:
            self._send_lock.release()

    def _settle_flushes(self, closed: bool = False) -> None:
        handled = self._step.handled
        for waiter in list(self._flush_waiters):
            target, loop, done = waiter
            if handled >= target:
                _aio.resolve_threadsafe(loop, done)
            elif closed:
                message = f"{self!r} closed with {target - handled} item(s) of a flush unsent"
                _aio.resolve_threadsafe(loop, done, RuntimeError(message))
            else:
                continue
            with contextlib.suppress(ValueError):  # settled by another thread meanwhile
                self._flush_waiters.remove(waiter)

    async def flush(self, timeout: float | None = None) -> None:
        """Return once everything published so far is handed to ZMQ (or settled otherwise:
        dropped for failing to encode); ``RuntimeError`` on a closed or failed publisher."""
        if self._refusing():
            raise self._refusal("flush()")
        target = self._published
        self._send_now()
        if self._step.handled >= target:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._flush_waiters.append((target, loop, done))
        self._writer.want()  # it settles waiters under the send lock, this one included
        await _aio.wait(done, timeout, lambda: f"{self!r}: flush not done within {timeout} s")

    async def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> None:
        """Return once ``count`` subscriptions reached this publisher; ``TimeoutError`` otherwise.

        It counts subscriptions, not subscribers: each topic a subscriber subscribes to is
        one (the default, every topic, is one). After this returns, items published reach
        those subscribers: no sleep is needed against ZMQ's slow-joiner problem.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.001
        while True:
            if self._refusing():
                if self._closing():
                    raise RuntimeError(
                        f"{self!r} closed with {self._step.subscriptions} of {count} subscriptions"
                    )
                raise self._refusal("wait_for_subscribers()")
            if self.subscriptions >= count:
                return
            remaining = delay if deadline is None else deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self!r}: {self._step.subscriptions} of {count} subscriptions within "
                    f"{timeout} s"
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(2 * delay, 0.02)

    @property
    def subscriptions(self) -> int:
        """Subscriptions currently known to this publisher (read from the socket if it is
        free; see :meth:`wait_for_subscribers`)."""
        if self._send_lock.acquire(blocking=False):
            try:
                if not self._socket_closed():
                    self._step.read_subscriptions()
            finally:
                self._send_lock.release()
            self._send_now()  # what was published while this held the lock
        return self._step.subscriptions
