"""The ZeroMQ publisher: ``publish()`` checks and queues, and who sends the queue.

Inside a running event loop, the loop sends: an idle item at once, the rest of a loop turn
together from one ``call_soon`` callback, and inline whenever a full message's worth is queued.
A thread without an event loop sends an item at once when it publishes after a pause, and
leaves a burst to the writer thread (:class:`~wirebus.transport._sender.Writer`), which also
sends what a blocked or closed loop leaves queued. Whoever sends holds the send lock, and after
releasing it looks at the queue again, so no item is ever left behind by a lock another thread
held.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import enum
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import zmq

from wirebus import _aio
from wirebus.codec import TOPIC_FRAME_SIZE, MessageCodec, check_codec, run_encoding_of
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import MessagePublisher, RateLimitedLog, logger, safe_repr
from wirebus.transport._sender import Entry, SendStep, Writer
from wirebus.transport._socket import OwnedSocket

T = TypeVar("T")

# A thread without an event loop is in a burst when it publishes within this many seconds of
# its last send: the writer batches what follows, unless it is slower than this to come.
_BURST_GAP = 50e-6
# How long the writer leaves the tail of a loop-less burst to the publishing thread (s).
_WRITER_DELAY = 0.001
_EXIT_CLOSE_TIMEOUT = 2.0


class _State(enum.Enum):
    """Where a publisher is in its life; only :meth:`ZmqMessagePublisher._set_state` moves it.

    OPEN → FAILED (a socket error: ``publish()`` refuses, what is queued is still sent) →
    CLOSING → CLOSED. ``close()`` goes to CLOSING from OPEN or FAILED.
    """

    OPEN = "open"
    FAILED = "failed"
    CLOSING = "closing"
    CLOSED = "closed"


_OPEN = _State.OPEN


class _Due(enum.Enum):
    """Who is due to send what ``publish()`` queued (beyond a full message, sent at once)."""

    NOBODY = "nobody"
    LOOP = "the publishing event loop, from a call_soon callback"
    WRITER = "the writer thread, woken for a thread without an event loop"


_LOOP = _Due.LOOP


@dataclass(frozen=True)
class PublisherStats:
    """A snapshot of one publisher's counters.

    ``published`` items were accepted by ``publish()``; of those, ``sent`` were handed to ZMQ
    in ``messages`` messages, ``conflated`` superseded before sending (``conflate=True``),
    ``encode_errors`` failed to encode in the send step (each reported to ``on_error``), and
    ``lost`` were in a run the socket failed to send. ``pending`` are the rest: still queued.
    """

    published: int
    sent: int
    messages: int
    conflated: int
    encode_errors: int = 0
    lost: int = 0

    @property
    def pending(self) -> int:
        return self.published - self.sent - self.conflated - self.encode_errors - self.lost


_live_publishers: weakref.WeakSet[ZmqMessagePublisher[Any]] = weakref.WeakSet()


@atexit.register
def close_live_publishers() -> None:
    """Close every publisher still open (at exit, within a shared deadline)."""
    deadline = time.monotonic() + _EXIT_CLOSE_TIMEOUT
    for publisher in list(_live_publishers):
        publisher.close(timeout=max(0.0, deadline - time.monotonic()))


class ZmqMessagePublisher(MessagePublisher[T]):
    """Publishes items over a ZMQ XPUB socket; see ``docs/pubsub.md``.

    ``bind=True`` binds ``address`` (``tcp://127.0.0.1:*`` picks a free port; :attr:`address`
    tells the one bound); ``bind=False`` connects to a bound subscriber (fan-in). With the
    defaults (``sndhwm=0``, ``linger=-1``, ``immediate=True``) nothing published after a
    subscriber is connected is lost. ``conflate=True`` sends only the newest of the items of one
    topic pending when they are sent (pair it with ``conflate=True`` on the subscriber).
    Without ``context`` the publisher owns a private ZMQ context, so that :meth:`close` can wait
    for delivery.

    With a codec that offers run encoding (``MsgspecCodec``, ``EventRecordCodec``),
    ``publish()`` takes ownership of the item and encodes it later, in the send step, a run of
    items in one call; an item that then fails to encode is dropped alone and reported to
    :meth:`on_error`. Other codecs encode in ``publish()``.

    ``heartbeat`` (ms, ``0``: off) turns on ZMTP heartbeats, so a connection over a cut link is
    dropped after ``3 * heartbeat`` ms. ``curve`` makes the socket a CurveZMQ server or client
    (:mod:`wirebus.security`, ``docs/deployment.md``).
    """

    def __init__(
        self,
        codec: MessageCodec[T],
        address: str,
        *,
        bind: bool = True,
        context: zmq.Context[Any] | None = None,
        sndhwm: int = 0,
        linger: int = -1,
        immediate: bool = True,
        conflate: bool = False,
        max_batch_bytes: int = 256 * 1024,
        allow_any_interface: bool = False,
        heartbeat: int = 0,
        curve: CurveServer | CurveClient | None = None,
    ) -> None:
        check_codec(codec)
        if not isinstance(linger, int) or linger < -1:
            raise ValueError(f"linger must be -1 (wait forever) or >= 0 ms, got {linger!r}")
        if not isinstance(sndhwm, int) or sndhwm < 0:
            raise ValueError(f"sndhwm must be >= 0 (0: no limit), got {sndhwm!r}")
        if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes!r}")
        self.codec = codec
        run_encoding = run_encoding_of(codec)
        self._topic_of = run_encoding.topic if run_encoding is not None else None
        self._linger = linger
        self.publisher_id = int.from_bytes(os.urandom(8), "little")
        self._queue: collections.deque[Entry] = collections.deque()
        self._published = 0
        self._due = _Due.NOBODY
        self._deferred_at = 0.0  # when the writer was last woken for a loop-less burst
        self._last_inline = 0.0  # when a loop-less publish() last sent at once
        self._state = _OPEN
        self._failure: Exception | None = None
        self._state_lock = threading.Lock()
        # Whoever holds the send lock owns the socket: it sends and reads subscriptions.
        self._send_lock = threading.Lock()
        self._flush_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._error_log = RateLimitedLog()
        self._owned = OwnedSocket(
            zmq.XPUB,
            address,
            bind=bind,
            context=context,
            private_context=not address.startswith("inproc://"),
            options=[
                (zmq.SNDHWM, sndhwm),
                (zmq.IMMEDIATE, int(immediate)),
                (zmq.XPUB_VERBOSE, 1),
                (zmq.XPUB_VERBOSER, 1),
                (zmq.LINGER, linger),
            ],
            curve=curve,
            heartbeat=heartbeat,
            allow_any_interface=allow_any_interface,
            owner=f"publisher for {address}",
        )
        self.address = self._owned.address
        self._step = SendStep(
            self._owned.socket,
            self.publisher_id,
            codec,
            run_encoding,
            conflate,
            max_batch_bytes,
            self.on_error,
            safe_repr(self),
        )
        self._writer = Writer(
            f"wirebus-publisher {self.address}",
            self._send_from_writer,
            self._queue,
            lambda: self._step.messages,
            self._forget_schedule,
        )
        _live_publishers.add(self)

    def __repr__(self) -> str:
        return f"ZmqMessagePublisher({safe_repr(self.codec)}, {self.address!r})"

    # -- the caller's side -------------------------------------------------------------------

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        step = self._step
        return PublisherStats(
            self._published,
            step.sent,
            step.messages,
            step.conflated,
            step.encode_errors,
            step.lost,
        )

    def publish(self, item: T) -> None:
        if self._state is not _OPEN:
            raise self._refusal("publish()")
        topic_of = self._topic_of
        if topic_of is None:
            entry = self._encode_now(item)
        else:
            topic = topic_of(item)
            if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
                raise _bad_topic(self.codec, item, topic)
            entry = (topic, item)
        queue = self._queue
        queue.append(entry)
        self._published += 1
        if len(queue) >= _wire.MAX_ITEMS:
            self._send_now()  # a full message's worth: no need to wait
        elif self._due is not _LOOP:
            self._schedule()

    def publish_many(self, items: Iterable[T]) -> None:
        """Queue ``items`` in order in one call; every check of :meth:`publish` runs first, so
        a bad item leaves none of them queued."""
        if self._state is not _OPEN:
            raise self._refusal("publish_many()")
        topic_of = self._topic_of
        if topic_of is None:
            entries = [self._encode_now(item) for item in items]
        else:
            entries = [(topic_of(item), item) for item in items]
            for topic, item in entries:
                if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
                    raise _bad_topic(self.codec, item, topic)
        if not entries:
            return
        queue = self._queue
        queue.extend(entries)
        self._published += len(entries)
        if len(queue) >= _wire.MAX_ITEMS:
            self._send_now()
        elif self._due is not _LOOP:
            self._schedule()

    def _encode_now(self, item: T) -> Entry:
        """Encode with a codec that has no run encoding, checking what it returned."""
        entry: object = self.codec.encode(item)
        try:
            topic, payload = cast("tuple[object, object]", entry)
        except (TypeError, ValueError):
            raise ValueError(
                f"{safe_repr(self.codec)} encoded {safe_repr(item)} as {safe_repr(entry)}, "
                "not a (topic, payload) pair"
            ) from None
        if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
            raise _bad_topic(self.codec, item, topic)
        if payload.__class__ is not bytes:
            if isinstance(payload, memoryview):
                payload = payload.tobytes()  # its bytes, whatever its item size
            elif isinstance(payload, bytearray):
                payload = bytes(payload)
            else:
                raise TypeError(
                    f"{safe_repr(self.codec)} encoded {safe_repr(item)} with a payload of type "
                    f"{type(payload).__name__}; payloads must be bytes-like"
                )
        return topic, payload

    def on_error(self, exc: BaseException, item: T) -> None:
        """Called on the sending thread for an item that failed to encode in the send step.

        The item is dropped (``stats.encode_errors``), everything else is delivered. The
        default logs it, at most a few times in ten seconds. Override it in a subclass.
        """
        self._error_log(
            logging.ERROR,
            f"{safe_repr(self)}: dropped {safe_repr(item)}: it failed to encode: {safe_repr(exc)}",
            exc,
        )

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
            self._due = _LOOP
            loop.call_soon(self._send_scheduled)
            if len(self._queue) == 1:  # idle: send this one now, batch the rest of this turn
                self._send_now()
            if not self._writer.ticking:  # it sends what a blocked or closed loop leaves
                self._writer.start_ticking()
            return
        now = time.perf_counter()
        if len(self._queue) == 1 and now - self._last_inline > _BURST_GAP:
            self._last_inline = now
            self._send_now()
        else:  # a burst: batched by this thread's next publish() or, failing that, the writer
            self._due = _Due.WRITER
            self._deferred_at = now
            self._writer.want(after=_WRITER_DELAY)

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
                self._send_locked()
            finally:
                lock.release()

    def _send_locked(self) -> None:
        if self._owned.socket.closed:
            return
        queue = self._queue
        while queue:
            try:
                self._step.send(queue)
            except Exception as exc:
                self._fail(exc)
        if self._flush_waiters:
            self._settle_flushes()

    def _fail(self, exc: Exception) -> None:
        """A socket error: refuse from now on; what is still queued is still sent."""
        self._error_log(
            logging.ERROR,
            f"{safe_repr(self)}: sending failed ({safe_repr(exc)}); the run being sent is "
            "lost and publish() refuses from now on",
            exc,
        )
        if self._failure is None:
            self._failure = exc
        self._set_state(_State.FAILED, only_from=_OPEN)

    def _set_state(self, state: _State, only_from: _State | tuple[_State, ...]) -> bool:
        with self._state_lock:
            allowed = only_from if isinstance(only_from, tuple) else (only_from,)
            if self._state not in allowed:
                return False
            self._state = state
            return True

    def _refusal(self, what: str) -> RuntimeError:
        exc = RuntimeError(f"{what} on {self._state.value} {self!r}")
        exc.__cause__ = self._failure
        return exc

    async def flush(self, timeout: float | None = None) -> None:
        if self._state in (_State.CLOSING, _State.CLOSED):
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
            self._flush_waiters.remove(waiter)

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
            if self._state in (_State.CLOSING, _State.CLOSED):
                raise RuntimeError(
                    f"{self!r} closed with {self._step.subscriptions} of {count} subscriptions"
                )
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
                if not self._owned.socket.closed:
                    self._step.read_subscriptions()
            finally:
                self._send_lock.release()
        return self._step.subscriptions

    def close(self, timeout: float | None = None) -> None:
        """Send everything pending, then close the socket; idempotent and thread-safe.

        Delivery waits up to ``linger`` ms (``-1``: until delivered), and at most ``timeout``
        seconds when given: whatever happens in the send step, ``close`` returns by then.
        """
        if not self._set_state(_State.CLOSING, only_from=(_OPEN, _State.FAILED)):
            return
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)

        def remaining() -> float:
            return -1 if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            if not self._writer.stop(None if deadline is None else remaining()):
                logger.error("%s: the writer thread did not end in time", safe_repr(self))
            if not self._send_lock.acquire(timeout=remaining()):
                logger.error("%s: the socket stayed busy; not closed", safe_repr(self))
                return
            try:
                self._send_locked()
                linger = self._linger
                if deadline is not None:
                    budget = int(remaining() * 1000)
                    linger = budget if linger < 0 else min(linger, budget)
                self._owned.close(linger)
            finally:
                self._send_lock.release()
        finally:
            self._set_state(_State.CLOSED, only_from=_State.CLOSING)
            self._settle_flushes(closed=True)
            _live_publishers.discard(self)


def _bad_topic(codec: object, item: object, topic: object) -> Exception:
    if not isinstance(topic, bytes):
        return TypeError(
            f"{safe_repr(codec)} gave {safe_repr(item)} the topic {safe_repr(topic)} of type "
            f"{type(topic).__name__}; topics are bytes (use make_topic)"
        )
    return ValueError(
        f"{safe_repr(codec)} gave {safe_repr(item)} the topic {topic!r} of {len(topic)} bytes; "
        f"topics must be exactly TOPIC_FRAME_SIZE ({TOPIC_FRAME_SIZE}) bytes (use make_topic)"
    )
