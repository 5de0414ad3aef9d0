"""Pub/sub: typed publishers and subscribers over ZeroMQ, asyncio native, batching.

A :class:`ZmqMessagePublisher` encodes items with its codec in :meth:`~ZmqMessagePublisher.publish`
(which never blocks) and queues them. Inside a running event loop the loop sends the queue (an
idle item at once, the rest of a loop turn together); elsewhere a writer thread does. Either
way consecutive items of one topic go out in one single-frame ZMQ message, so under load one
send carries many items. A :class:`ZmqMessageSubscriber` drains its socket to EAGAIN in a reader
callback; decoding and :meth:`~MessageSubscriber.process` run in a consumer that starts right
there when idle and carries on in a task when it has to wait, so neither a bad payload nor a
failing ``process()`` can stall the reader.

Every message carries the publisher's id and per-topic sequence numbers, so a subscriber counts
what the transport dropped (``stats.dropped``). The exact layout is in ``docs/wire-format.md``.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import itertools
import logging
import operator
import os
import struct
import threading
import time
import weakref
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import zmq

from wirebus import _aio, _endpoint, security
from wirebus._resource import Resource
from wirebus.codec import TOPIC_FRAME_SIZE, MessageCodec, check_codec, make_topic
from wirebus.security import CurveClient, CurveServer

__all__ = [
    "WIRE_VERSION",
    "MessagePublisher",
    "MessageSubscriber",
    "PublisherStats",
    "SubscriberStats",
    "ZmqMessagePublisher",
    "ZmqMessageSubscriber",
]

T = TypeVar("T")
_Sub = TypeVar("_Sub", bound="MessageSubscriber[Any]")

logger = logging.getLogger("wirebus.transport")

WIRE_VERSION = 1
"""Version byte of the wire format written and accepted by this release."""

# topic | version u8, flags u8, reserved u16, count u32, publisher id u64, first seq u64 |
# count x u32 payload lengths | payloads
_HEADER = struct.Struct("<BBHIQQ")
_BODY = TOPIC_FRAME_SIZE + _HEADER.size
_MAX_BATCH_ITEMS = 128
_LENGTHS = [struct.Struct(f"<{n}I") for n in range(_MAX_BATCH_ITEMS + 1)]
_DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
# the two halves of a queue entry: (topic, payload), or (_MARKER, a _Marker)
_TOPIC = operator.itemgetter(0)
_PAYLOAD = operator.itemgetter(1)


@dataclass(frozen=True)
class PublisherStats:
    """A snapshot of one publisher's counters.

    ``published`` items were accepted by ``publish()``, ``sent`` handed to ZMQ in ``messages``
    ZMQ messages, ``conflated`` superseded before sending (``conflate=True``); ``pending`` are
    accepted but not yet handed to ZMQ.
    """

    published: int
    sent: int
    messages: int
    conflated: int

    @property
    def pending(self) -> int:
        return self.published - self.sent - self.conflated


@dataclass
class SubscriberStats:
    """Counters of one subscriber.

    ``received`` counts items that arrived (whether or not they decoded), ``dropped`` the
    items known to be missing from sequence gaps, ``decode_errors`` payloads the codec
    rejected, ``process_errors`` failed :meth:`~MessageSubscriber.process` calls and
    ``malformed`` ZMQ messages that are not in the wirebus wire format.
    """

    received: int = 0
    dropped: int = 0
    decode_errors: int = 0
    process_errors: int = 0
    malformed: int = 0
    messages: int = 0


class MessagePublisher(Resource, Generic[T]):
    """Publishes items of type ``T``; transport-agnostic. ``with``/``async with`` close it."""

    @abstractmethod
    def publish(self, item: T) -> None:
        """Queue ``item`` for sending. Never blocks; safe with or without a running loop."""

    @abstractmethod
    async def flush(self, timeout: float | None = None) -> None:
        """Return once everything published so far is handed to the transport."""

    @abstractmethod
    def close(self, timeout: float | None = None) -> None:
        """Send what is pending (within ``timeout`` if given), then release everything."""

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close, timeout)


class MessageSubscriber(Resource, Generic[T]):
    """Receives items of type ``T``; transport-agnostic.

    Subclasses deliver decoded batches to :meth:`process`. Override :meth:`process` to consume
    batches directly; the default queues items for :meth:`receive` and ``async for``.
    """

    def __init__(self, *, conflate: bool = False) -> None:
        self._received: collections.deque[T] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._closed = False
        self._conflate = conflate

    @abstractmethod
    async def start(self) -> None:
        """Start receiving in the running event loop (also done by ``async with``)."""

    @abstractmethod
    def close(self) -> None:
        """Stop receiving and release everything; idempotent."""

    async def process(self, items: list[T]) -> None:
        """Consume a batch of decoded items, in arrival order.

        The default queues them for :meth:`receive`; a conflating subscriber's queue keeps
        only the newest batch (one item per publisher).
        """
        if self._conflate:
            self._received.clear()
        self._received.extend(items)
        if self._arrived is not None:
            self._arrived.set()

    async def receive(self, timeout: float | None = None) -> T:
        """Return the next queued item; ``TimeoutError`` when none arrives within ``timeout``.

        Only meaningful while :meth:`process` is the default one.
        """
        while not self._received:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._arrived is None:
                self._arrived = asyncio.Event()
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{self!r}: nothing arrived within {timeout} s") from None
        return self._received.popleft()

    def __aiter__(self) -> AsyncIterator[T]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        while True:
            try:
                yield await self.receive()
            except RuntimeError:
                if self._closed:
                    return
                raise

    def _wake_receivers(self) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def on_error(self, exc: BaseException, payload: bytes | None) -> None:
        """Called when the codec's ``on_decode_error`` or :meth:`process` raises.

        ``payload`` is the payload that failed, or ``None`` for a failed batch. The default
        logs the exception with its traceback. Reading goes on either way.
        """
        logger.error("%r: %s", self, exc, exc_info=exc)

    async def __aenter__(self: _Sub) -> _Sub:
        """Start receiving (``async with`` closes on exit)."""
        await self.start()
        return self


class _Marker:
    """A control entry in the publisher's queue, run in order by whoever sends the queue.

    A ``writer_only`` marker (close) runs on the writer thread: an event loop that meets it
    hands the rest of the queue to the writer.
    """

    __slots__ = ("action", "writer_only")

    def __init__(
        self, action: Callable[[ZmqMessagePublisher[Any]], bool], writer_only: bool = False
    ) -> None:
        self.action = action  # returns True when the writer must stop
        self.writer_only = writer_only


_Entry = tuple[bytes, bytes | _Marker]  # (topic, payload), or (_MARKER, marker)
_WRITER_TICK = 20  # ms
_WRITER = "the writer thread"
_MARKER = b""  # the topic of a marker's queue entry; an item's topic is never empty
_live_publishers: weakref.WeakSet[ZmqMessagePublisher[Any]] = weakref.WeakSet()
_EXIT_CLOSE_TIMEOUT = 2.0


@atexit.register
def _close_live_publishers() -> None:
    deadline = time.monotonic() + _EXIT_CLOSE_TIMEOUT
    for publisher in list(_live_publishers):
        publisher.close(timeout=max(0.0, deadline - time.monotonic()))


class ZmqMessagePublisher(MessagePublisher[T]):
    """Publishes items over a ZMQ XPUB socket; see the module docstring and ``docs/pubsub.md``.

    ``bind=True`` binds ``address`` (``tcp://127.0.0.1:*`` picks a free port; :attr:`address`
    tells the one bound); ``bind=False`` connects to a bound subscriber (fan-in). With the
    defaults (``sndhwm=0``, ``linger=-1``, ``immediate=True``) nothing published after a
    subscriber is connected is lost. ``conflate=True`` sends only the newest of the items of one
    topic pending when they are sent (pair it with ``conflate=True`` on the
    subscriber). Without ``context`` the publisher owns a private ZMQ context, so that
    :meth:`close` can wait for delivery.

    ``heartbeat`` (ms, ``0``: off) turns on ZMTP heartbeats, so a connection over a cut link is
    dropped after ``3 * heartbeat`` ms (see :func:`_set_heartbeat`). ``curve`` makes the
    socket a CurveZMQ server or client (:mod:`wirebus.security`, ``docs/deployment.md``).
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
        _endpoint.check_address(address, bind=bind, allow_any_interface=allow_any_interface)
        _check_security(curve, address, context, heartbeat)
        if linger < -1:
            raise ValueError(f"linger must be -1 (wait forever) or >= 0 ms, got {linger}")
        if sndhwm < 0:
            raise ValueError(f"sndhwm must be >= 0 (0: no limit), got {sndhwm}")
        if max_batch_bytes < 1:
            raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes}")
        self.codec = codec
        self._encode = codec.encode
        self._published = 0
        self._sent = 0
        self._messages = 0
        self._conflated = 0
        self._linger = linger
        self._conflate = conflate
        self._max_batch_bytes = max_batch_bytes
        self.publisher_id = int.from_bytes(os.urandom(8), "little")
        self._seqs: dict[bytes, int] = {}
        self._queue: collections.deque[_Entry] = collections.deque()
        self._refusal: str | None = None  # why publish() refuses: closed, or the writer failed
        self._failure: Exception | None = None
        # Whoever holds _send_lock owns the socket: it sends the queue and reads subscriptions.
        self._send_lock = threading.Lock()
        # Who sends the queue soon: an event loop (a callback is scheduled), _WRITER, or nobody.
        self._flusher: object = None
        self._ticking = False  # the writer wakes every tick (see _start_ticking)
        self._wanted = False  # the writer must send the queue (items from threads, markers)
        self._sleeping = False
        self._subscriptions = 0
        self._subscription_waiters: list[
            tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]
        ] = []
        self._owns_context = context is None and not address.startswith("inproc://")
        if context is not None:
            self._context = context
        elif self._owns_context:
            self._context = zmq.Context(io_threads=1)
        else:
            self._context = zmq.Context.instance()
        self._authenticator: security._Authenticator | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._socket: zmq.Socket[bytes] = self._context.socket(zmq.XPUB)
        try:
            sock = self._socket
            sock.setsockopt(zmq.SNDHWM, sndhwm)
            sock.setsockopt(zmq.IMMEDIATE, int(immediate))
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.XPUB_VERBOSER, 1)
            sock.setsockopt(zmq.LINGER, linger)
            _set_heartbeat(sock, heartbeat, connecting=not bind)
            security._configure(sock, curve)
            if isinstance(curve, CurveServer) and curve.allowed_clients is not None:
                self._authenticator = security._Authenticator(
                    self._context, curve, f"publisher for {address}"
                )
            if bind:
                self.address = _endpoint.bind(sock, address, allow_any_interface)
            else:
                self.address = _endpoint.connect(sock, address)
        except BaseException:
            self._release()
            raise
        if self._authenticator is not None:
            self._authenticator.owner = repr(self)
        self._thread = threading.Thread(
            target=self._run, name=f"wirebus-publisher {self.address}", daemon=True
        )
        self._thread.start()
        _live_publishers.add(self)

    def __repr__(self) -> str:
        return f"ZmqMessagePublisher({self.codec!r}, {self.address!r})"

    # -- caller side -------------------------------------------------------------------------

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        return PublisherStats(self._published, self._sent, self._messages, self._conflated)

    def publish(self, item: T) -> None:
        if self._refusal is not None:
            raise RuntimeError(f"publish() on {self._refusal} {self!r}") from self._failure
        entry = self._encode(item)
        try:
            topic, _ = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"{self.codec!r} encoded {item!r} as {entry!r}, not a (topic, payload) pair"
            ) from None
        if len(topic) != TOPIC_FRAME_SIZE:
            raise ValueError(
                f"{self.codec!r} encoded topic {topic!r} of {len(topic)} bytes; topics must be "
                f"exactly TOPIC_FRAME_SIZE ({TOPIC_FRAME_SIZE}) bytes (use make_topic)"
            )
        queue = self._queue
        queue.append(entry)
        self._published += 1
        if len(queue) >= _MAX_BATCH_ITEMS:
            self._send_now()  # a full message's worth: no need to wait
        elif self._flusher is None:
            self._schedule_send()

    def _schedule_send(self) -> None:
        """Have the queue sent soon: by the caller's event loop if it has one, else the writer."""
        loop = asyncio._get_running_loop()
        if loop is None:
            self._flusher = _WRITER
            self._want_writer()
        else:
            self._flusher = loop
            loop.call_soon(self._send_soon)
            if len(self._queue) == 1:  # idle: send this one now, batch the rest of this turn
                self._send_now()
            if not self._ticking:
                self._start_ticking()

    def _start_ticking(self) -> None:
        """Have the writer wake every ``_WRITER_TICK`` ms from now on.

        Needed once threads other than the writer send, or are due to: the writer then sends
        what a blocked loop leaves queued, and reads the subscriptions whose FD edge their
        sends took (they do not read them, a ZMQ call that costs microseconds per message).
        The writer stops ticking after a tick in which nothing was sent and nothing is queued.
        """
        self._ticking = True
        self._wake_writer()

    def _want_writer(self) -> None:
        self._wanted = True
        self._wake_writer()

    def _wake_writer(self) -> None:
        if self._sleeping:
            self._sleeping = False
            with contextlib.suppress(BlockingIOError):  # the pipe is full of wake-ups already
                os.write(self._wake_w, b"\0")

    def _send_soon(self) -> None:
        self._flusher = None
        self._send_now()

    def _send_now(self) -> None:
        """Send the queue from the calling thread, unless another thread is sending it.

        That thread goes on until the queue is empty, so nothing is left behind.
        """
        if not self._send_lock.acquire(blocking=False):
            return
        try:
            if not self._ticking:  # under the lock, as the writer stops ticking under it
                self._start_ticking()
            if not self._socket.closed:
                self._send_queue(writer=False)
        finally:
            self._send_lock.release()

    def _send_queue(self, writer: bool) -> bool:
        """:meth:`_send_pending`, where a failure is logged and fails the publisher (see
        :meth:`_fail`); what follows the run that failed stays queued and is sent."""
        try:
            return self._send_pending(writer)
        except Exception as exc:
            logger.exception("%r: sending failed; publish() refuses from now on", self)
            self._fail(exc)
            return False

    def _fail(self, exc: Exception) -> None:
        """Refuse from now on. The writer sends what is still queued; the socket stays open
        until :meth:`close`, so its linger and timeout apply as usual."""
        if self._failure is None:
            self._failure = exc
        if self._refusal is None:
            self._refusal = f"failed ({exc!r})"
        self._want_writer()

    def _put_marker(self, action: Callable[[ZmqMessagePublisher[Any]], bool]) -> None:
        if self._refusal is not None:
            raise RuntimeError(f"{self._refusal} {self!r}") from self._failure
        self._queue.append((_MARKER, _Marker(action)))
        self._want_writer()

    async def flush(self, timeout: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def notify(_: ZmqMessagePublisher[Any]) -> bool:
            _aio.resolve_threadsafe(loop, done)
            return False

        self._put_marker(notify)
        await _aio.wait(done, timeout, lambda: f"{self!r}: flush not done within {timeout} s")

    async def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> None:
        """Return once ``count`` subscriptions reached this publisher; ``TimeoutError`` otherwise.

        Each topic a subscriber subscribes to is one subscription (the default, every topic,
        is one). After this returns, items published reach those subscribers: no sleep is
        needed against ZMQ's slow-joiner problem.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def register(publisher: ZmqMessagePublisher[Any]) -> bool:
            publisher._subscription_waiters.append((count, loop, done))
            publisher._check_subscription_waiters()
            return False

        self._put_marker(register)
        await _aio.wait(
            done,
            timeout,
            lambda: f"{self!r}: {self._subscriptions} of {count} subscriptions within {timeout} s",
        )

    @property
    def subscriptions(self) -> int:
        """Subscriptions currently known to this publisher."""
        return self._subscriptions

    def close(self, timeout: float | None = None) -> None:
        """Send everything pending, then close the socket; idempotent.

        Delivery waits up to ``linger`` ms (``-1``: until delivered), and at most ``timeout``
        seconds when given; what is not delivered by then is dropped.
        """
        if self._refusal == "closed":
            return
        linger = self._linger
        if timeout is not None:
            budget = max(0, int(timeout * 1000))
            linger = budget if linger < 0 else min(linger, budget)
        self._refusal = "closed"  # publish() refuses from here on; the close marker comes last
        self._queue.append((_MARKER, _Marker(lambda publisher: publisher._finish(linger), True)))
        self._want_writer()
        self._thread.join()
        unsent = sum(topic != _MARKER for topic, _ in self._queue)
        if unsent:
            why = "sending failed" if self._failure else "published during close()"
            logger.warning("%r: %d item(s) not sent: %s", self, unsent, why)
        _live_publishers.discard(self)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _release(self) -> None:
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.close()
        if self._owns_context:
            self._context.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        """Send what threads without an event loop publish, run markers, read subscriptions.

        The writer polls the socket's file descriptor, not the socket, so that an event loop
        can send meanwhile (under ``_send_lock``). Once another thread sends, it also wakes
        every ``_WRITER_TICK`` ms, reads subscriptions, and sends the queue itself if nothing
        was sent since the last tick: a loop that is blocked or closed delays delivery, but
        never stops it.
        """
        poller = zmq.Poller()
        poller.register(self._socket.getsockopt(zmq.FD), zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        queue = self._queue
        sent_at_tick = -1
        try:
            while True:
                self._sleeping = True
                ticked = False
                if not self._wanted:
                    ticked = not poller.poll(_WRITER_TICK if self._ticking else None)
                    _drain_pipe(self._wake_r)
                self._sleeping = False
                wanted = self._wanted
                if wanted:  # cleared only once seen: what was queued before is sent below
                    self._wanted = False
                idle = ticked and self._messages == sent_at_tick
                stalled = idle and bool(queue)
                if wanted or stalled:
                    self._flusher = None  # a loop's callback may never run: schedule anew
                if ticked:
                    sent_at_tick = self._messages
                with self._send_lock:
                    if (wanted or stalled) and self._send_queue(writer=True):
                        return
                    self._read_subscriptions()  # sending may have taken the FD's edge
                    if idle and not stalled:  # callers restart it (under this lock) to send
                        self._flusher = None  # the next publish() schedules anew: see above
                        self._ticking = False
                        if queue:  # queued meanwhile, and its sender may have seen True
                            self._ticking = True
        except Exception as exc:
            logger.exception("%r: writer thread failed; closing the socket", self)
            self._fail(exc)
            with self._send_lock:
                self._finish(0)

    def _send_pending(self, writer: bool) -> bool:
        """Send everything queued, batching runs of one topic; True when a marker said stop.

        Runs under ``_send_lock``. Outside the writer thread a ``writer_only`` marker goes
        back to the head of the queue, with everything after it, for the writer.
        """
        queue = self._queue
        popleft = queue.popleft
        while queue:
            runs = itertools.groupby(
                itertools.starmap(popleft, itertools.repeat((), len(queue))), _TOPIC
            )
            for topic, run in runs:
                # An entry's second half is a payload unless its topic is _MARKER.
                if topic != _MARKER:
                    try:
                        self._send_run(topic, cast("list[bytes]", list(map(_PAYLOAD, run))))
                    except Exception:  # the run is dropped; what follows it stays queued
                        _put_back(queue, runs)
                        raise
                    continue
                for entry in run:
                    marker = cast(_Marker, entry[1])
                    if marker.writer_only and not writer:
                        _put_back(queue, runs, entry, *run)
                        self._want_writer()
                        return False
                    if marker.action(self):
                        return True
        return False

    def _send_run(self, topic: bytes, payloads: list[bytes]) -> None:
        """Send consecutive items of one topic in as few messages as the limits allow.

        With ``conflate`` only the newest goes; the sequence numbers of the ones it
        supersedes are skipped, so subscribers count them.
        """
        if self._conflate:
            self._send_batch(topic, payloads[-1:], [len(payloads[-1])], len(payloads) - 1)
            return
        lengths = list(map(len, payloads))
        start = 0
        while start < len(payloads):
            end = start + _MAX_BATCH_ITEMS
            if sum(lengths[start:end]) > self._max_batch_bytes:
                end = _fit(lengths, start, self._max_batch_bytes)
            self._send_batch(topic, payloads[start:end], lengths[start:end], 0)
            start = end
            if self._messages % 64 == 0:  # a long queue: keep the subscription count current
                self._read_subscriptions()

    def _send_batch(
        self, topic: bytes, payloads: list[bytes], lengths: list[int], superseded: int
    ) -> None:
        count = len(payloads)
        first = self._seqs.get(topic, 0) + superseded
        self._seqs[topic] = first + count
        header = _HEADER.pack(WIRE_VERSION, 0, 0, count, self.publisher_id, first)
        table = _LENGTHS[count].pack(*lengths)
        self._socket.send(b"".join((topic, header, table, *payloads)))
        self._sent += count
        self._conflated += superseded
        self._messages += 1

    def _read_subscriptions(self) -> None:
        sock = self._socket
        changed = False
        while True:
            try:
                message = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                self._subscriptions += 1
                changed = True
            elif message[:1] == b"\x00":
                self._subscriptions -= 1
        if changed:
            self._check_subscription_waiters()

    def _check_subscription_waiters(self) -> None:
        waiting = []
        for count, loop, future in self._subscription_waiters:
            if self._subscriptions >= count:
                _aio.resolve_threadsafe(loop, future)
            elif not future.done():  # a waiter that timed out is forgotten
                waiting.append((count, loop, future))
        self._subscription_waiters = waiting

    def _finish(self, linger: int) -> bool:
        for count, loop, future in self._subscription_waiters:
            message = f"{self!r} closed with {self._subscriptions} of {count} subscriptions"
            _aio.resolve_threadsafe(loop, future, RuntimeError(message))
        self._subscription_waiters = []
        self._socket.close(linger=linger)
        if self._authenticator is not None:
            # Handshakes still under way fail from here on (ZAP_ENFORCE_DOMAIN), delivery
            # over connections already authenticated goes on while term() waits for it.
            self._authenticator.close()
        if self._owns_context:
            self._context.term()  # returns once pending messages are delivered or linger ends
        return True


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


def _put_back(
    queue: collections.deque[_Entry],
    runs: Iterator[tuple[bytes, Iterator[_Entry]]],
    *head: _Entry,
) -> None:
    """Return ``head``, then what ``runs`` has not yielded yet, to the front of ``queue``."""
    queue.extendleft(reversed([*head, *itertools.chain.from_iterable(r for _, r in runs)]))


def _fit(lengths: list[int], start: int, max_bytes: int) -> int:
    """The end of the longest run from ``start`` whose lengths sum to at most ``max_bytes``.

    The run holds at least one item, and at most ``_MAX_BATCH_ITEMS``.
    """
    size = lengths[start]
    end = start + 1
    while end < len(lengths) and end - start < _MAX_BATCH_ITEMS:
        size += lengths[end]
        if size > max_bytes:
            break
        end += 1
    return end


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _topic_filter(topic: str | bytes) -> bytes:
    """``""``/``b""`` subscribes to every topic; anything else to that exact (padded) topic."""
    if topic in (b"", ""):
        return b""
    return make_topic(topic)


def _check_security(
    curve: CurveServer | CurveClient | None,
    address: str,
    context: zmq.Context[Any] | None,
    heartbeat: int,
) -> None:
    if not isinstance(heartbeat, int) or heartbeat < 0:
        raise ValueError(f"heartbeat must be an int >= 0 ms (0: off), got {heartbeat!r}")
    security._check_curve(curve, address)
    if context is not None and security._needs_authenticator(curve):
        raise ValueError(
            "a CurveServer with allowed_clients runs a ZAP authenticator in a ZMQ context of "
            "its own: do not pass context"
        )


_MAX_HEARTBEAT_TTL = 6_553_599  # ms: the largest TTL a ZMTP PING carries


def _set_heartbeat(sock: zmq.Socket[bytes], heartbeat: int, connecting: bool) -> None:
    """ZMTP heartbeats every ``heartbeat`` ms; a peer silent for 3x that is disconnected.

    ``HEARTBEAT_TIMEOUT`` drops the connection when nothing arrives for ``3 * heartbeat`` ms
    after a PING, ``HEARTBEAT_TTL`` asks the peer to do the same. A connecting socket also
    gives up a TCP connect that has not completed in ``3 * heartbeat`` ms
    (``CONNECT_TIMEOUT``) and retries, so it reconnects promptly once a cut link is back
    instead of waiting out the kernel's SYN back-off. ``0`` changes nothing.
    """
    if heartbeat == 0:
        return
    timeout = 3 * heartbeat
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(timeout, _MAX_HEARTBEAT_TTL))
    if connecting:
        sock.setsockopt(zmq.CONNECT_TIMEOUT, timeout)


class ZmqMessageSubscriber(MessageSubscriber[T]):
    """Receives items over a ZMQ SUB socket; see the module docstring and ``docs/pubsub.md``.

    ``connect=True`` connects to a bound publisher; ``connect=False`` binds ``address`` so that
    many publishers can connect to it (fan-in). ``topics`` are exact topic names (padded with
    :func:`~wirebus.make_topic`); ``b""`` means every topic. ``conflate=True`` keeps only the
    newest message per connection. Messages larger than ``max_message_size`` bytes (``-1``: no
    limit) make ZMQ drop the connection of the peer that sent them.

    ``heartbeat`` and ``curve`` as for :class:`ZmqMessagePublisher`. A CURVE server with
    ``allowed_clients`` gets a private ZMQ context (its ZAP authenticator needs one), closed
    with the subscriber.
    """

    def __init__(
        self,
        codec: MessageCodec[T],
        address: str,
        *,
        connect: bool = True,
        topics: Iterable[str | bytes] = (b"",),
        context: zmq.Context[Any] | None = None,
        rcvhwm: int = 0,
        conflate: bool = False,
        max_message_size: int = _DEFAULT_MAX_MESSAGE_SIZE,
        allow_any_interface: bool = False,
        heartbeat: int = 0,
        curve: CurveServer | CurveClient | None = None,
    ) -> None:
        super().__init__(conflate=conflate)
        check_codec(codec)
        _endpoint.check_address(address, bind=not connect, allow_any_interface=allow_any_interface)
        _check_security(curve, address, context, heartbeat)
        if isinstance(topics, (str, bytes)):
            raise TypeError(f"topics must be an iterable of topic names, not {topics!r}")
        filters = [_topic_filter(topic) for topic in topics]
        if not filters:
            raise ValueError("topics must name at least one topic (b'' for every topic)")
        if rcvhwm < 0:
            raise ValueError(f"rcvhwm must be >= 0 (0: no limit), got {rcvhwm}")
        self.codec = codec
        concatenated_decoder = getattr(codec, "concatenated_decoder", None)
        self._decode_concatenated: Callable[[bytes, int], list[T]] | None = (
            concatenated_decoder() if concatenated_decoder is not None else None
        )
        self.stats = SubscriberStats()
        self._next_seq: dict[tuple[int, bytes], int] = {}
        self._frames: collections.deque[bytes] = collections.deque()
        self._newest: dict[bytes, bytes] = {}  # conflate: publisher id -> its newest frame
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None  # the consumer, once it had to wait
        self._consuming = False
        self._reading = False
        self._authenticator: security._Authenticator | None = None
        self._own_context: zmq.Context[Any] | None = None
        if security._needs_authenticator(curve):
            self._own_context = zmq.Context(io_threads=1)
        ctx: zmq.Context[Any] = context or self._own_context or zmq.Context.instance()
        self._socket: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        try:
            sock = self._socket
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, rcvhwm)
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_size)
            _set_heartbeat(sock, heartbeat, connecting=connect)
            security._configure(sock, curve)
            if isinstance(curve, CurveServer) and curve.allowed_clients is not None:
                self._authenticator = security._Authenticator(
                    ctx, curve, f"subscriber for {address}"
                )
            if conflate:
                sock.setsockopt(zmq.CONFLATE, 1)
            for topic in filters:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
            if connect:
                self.address = _endpoint.connect(sock, address)
            else:
                self.address = _endpoint.bind(sock, address, allow_any_interface)
        except BaseException:
            self._release_socket()
            raise
        self._fd: int = sock.getsockopt(zmq.FD)
        if self._authenticator is not None:
            self._authenticator.owner = repr(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.codec!r}, {self.address!r})"

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError(f"start() on closed {self!r}")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._resume_reading()

    # The reader: drain the edge-triggered FD to EAGAIN, every time, or it is never woken again.
    def _on_readable(self) -> None:
        if self._closed:
            return  # scheduled by start() or resume, but closed before it ran
        recv = self._socket.recv
        if self._conflate:
            newest = self._newest
            try:
                while True:
                    frame = recv(zmq.NOBLOCK)
                    newest[frame[_PUBLISHER_ID]] = frame  # older frames show up as seq gaps
            except zmq.Again:
                pass
            pending = bool(newest)
        else:
            frames = self._frames
            try:
                frames.append(recv(zmq.NOBLOCK))
                if not self._consuming:
                    # Deliver the first frame at once; draining to EAGAIN can wait that long.
                    self._start_consumer()
                    if self._socket.closed:  # process() closed the subscriber
                        return
                while True:
                    frames.append(recv(zmq.NOBLOCK))
                    if len(frames) >= _MAX_BUFFERED_FRAMES:
                        # Full: stop watching the FD; the consumer resumes and reads at once.
                        self._pause_reading()
                        break
            except zmq.Again:
                pass
            pending = bool(frames)
        if pending and not self._consuming:
            self._start_consumer()

    def _start_consumer(self) -> None:
        """Run the consumer's first step in the reader callback itself.

        Usually :meth:`_consume` delivers the frames and returns without waiting, and the
        items reach :meth:`process` without a trip through the event loop. If it has to
        wait (a ``process()`` that awaits, or more frames than one batch), a task carries
        on from where it stopped.
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

    def _decode_batch(self, items: list[T], failures: list[tuple[Exception, bytes | None]]) -> None:
        """Decode buffered frames until ``_ITEMS_PER_BATCH`` or more payloads have been taken,
        whether they decoded or not (so a flood of bad ones yields to the loop as often).

        A conflating subscriber takes every newest frame at once (one per publisher).
        """
        if self._conflate:
            newest = list(self._newest.values())
            self._newest.clear()
            for frame in newest:
                self._decode_frame(frame, items, failures)
            return
        frames, stats = self._frames, self.stats
        end = stats.received + stats.malformed + _ITEMS_PER_BATCH
        while frames and stats.received + stats.malformed < end:
            self._decode_frame(frames.popleft(), items, failures)

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and self._loop is not None and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
            self._loop.call_soon(self._on_readable)  # the edge may have come and gone

    async def _consume(self) -> None:
        """Decode and deliver the buffered frames, batch by batch, until none are left."""
        try:
            while self._frames or self._newest:
                items: list[T] = []
                failures: list[tuple[Exception, bytes | None]] = []
                self._decode_batch(items, failures)
                for exc, payload in failures:
                    await self._report(exc, payload)
                if items:
                    try:
                        await self.process(items)
                    except Exception as exc:
                        self.stats.process_errors += 1
                        await self._report(exc, None)
                if not self._reading:
                    self._resume_reading()
                if self._frames or self._newest:
                    await asyncio.sleep(0)  # let the reader and other tasks run between batches
        finally:
            self._consuming = False

    def _decode_frame(
        self, frame: bytes, items: list[T], failures: list[tuple[Exception, bytes | None]]
    ) -> None:
        stats = self.stats
        stats.messages += 1
        size = len(frame)
        try:
            version, _flags, _reserved, count, publisher, first = _HEADER.unpack_from(
                frame, TOPIC_FRAME_SIZE
            )
            if version != WIRE_VERSION:
                raise ValueError(f"wire format version {version}, expected {WIRE_VERSION}")
            if count > _MAX_BATCH_ITEMS:
                raise ValueError(f"count {count} > {_MAX_BATCH_ITEMS}")
            lengths = _LENGTHS[count].unpack_from(frame, _BODY)
            offset = _BODY + 4 * count
            if offset + sum(lengths) != size:
                raise ValueError(f"payload lengths {lengths} do not add up to {size} bytes")
        except (struct.error, ValueError) as exc:
            stats.malformed += 1
            failures.append((ValueError(f"malformed message of {size} bytes: {exc}"), frame))
            return
        key = (publisher, frame[:TOPIC_FRAME_SIZE])
        expected = self._next_seq.get(key, 0)
        if first > expected:
            stats.dropped += first - expected
        self._next_seq[key] = first + count
        if self._conflate and count > 1:  # only the newest item of the message
            offset += sum(lengths[:-1])
            stats.dropped += count - 1
            lengths = lengths[-1:]
            count = 1
        stats.received += count
        if self._decode_concatenated is not None and 0 not in lengths:  # b"" is never msgpack
            try:
                batch = self._decode_concatenated(frame[offset:], count)
            except Exception:
                pass  # some payload is bad: decode one by one, so each failure is handled
            else:
                if len(batch) == count:
                    items.extend(batch)
                    return
        view = memoryview(frame)
        decode = self.codec.decode
        for length in lengths:
            payload = view[offset : offset + length]
            offset += length
            try:
                items.append(decode(payload))
            except Exception as exc:
                stats.decode_errors += 1
                try:
                    fallback = self.codec.on_decode_error(payload, exc)
                except Exception as raised:
                    failures.append((raised, bytes(payload)))
                    continue
                if fallback is not None:
                    items.append(fallback)

    async def _report(self, exc: BaseException, payload: bytes | None) -> None:
        try:
            await self.on_error(exc, payload)
        except Exception:
            logger.exception("%r: on_error raised while handling %r", self, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pause_reading()
        if self._task is not None:
            self._task.cancel()
        self._release_socket()
        self._wake_receivers()

    def _release_socket(self) -> None:
        self._socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.close()
        if self._own_context is not None:
            self._own_context.term()

    async def aclose(self) -> None:
        task = self._task
        self.close()
        if task is not None and task is not asyncio.current_task():
            await asyncio.gather(task, return_exceptions=True)


_MAX_BUFFERED_FRAMES = 4096
_PUBLISHER_ID = slice(TOPIC_FRAME_SIZE + 8, TOPIC_FRAME_SIZE + 16)
# Items decoded per process() call. Larger batches are slower, not faster: every item of a
# batch is alive at once, and the cyclic GC's young-generation passes walk them all.
_ITEMS_PER_BATCH = 256
