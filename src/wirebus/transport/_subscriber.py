"""The ZeroMQ subscriber: a reader that drains its socket, a consumer that decodes and calls
``process()``, and a watch on the connection so that it is never cut off without saying so.

The reader runs in an event-loop callback on the socket's edge-triggered FD and always drains
to EAGAIN. The consumer's first step runs right there when it is idle; if it has to wait (a
``process()`` that awaits, or more than one batch), a task carries on from where it stopped.
Without an event loop, :meth:`ZmqMessageSubscriber.receive_blocking` reads in the caller's
thread instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Coroutine, Generator, Iterable, Iterator, Mapping
from typing import Any, TypeVar, cast

import zmq

from wirebus.codec import MessageCodec, check_codec, make_topic
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import MessageSubscriber, safe_repr
from wirebus.transport._decoder import Failure, FrameDecoder, Position, SubscriberStats
from wirebus.transport._recovery import Recovery
from wirebus.transport._socket import OwnedSocket
from wirebus.transport._watch import ConnectionWatch

T = TypeVar("T")

_DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
_MAX_BUFFERED_FRAMES = 4096
# Items decoded per process() call. Larger batches are slower, not faster: every item of a
# batch is alive at once, and the cyclic GC's young-generation passes walk them all.
_ITEMS_PER_BATCH = 256


class ZmqMessageSubscriber(MessageSubscriber[T]):
    """Receives items over a ZMQ SUB socket; see ``docs/pubsub.md``.

    ``connect=True`` connects to a bound publisher; ``connect=False`` binds ``address`` so that
    many publishers can connect to it (fan-in). ``topics`` are exact topic names (padded with
    :func:`~wirebus.make_topic`); ``b""`` means every topic. ``conflate=True`` keeps only the
    newest message per connection. A message larger than ``max_message_size`` bytes (``-1``:
    no limit) makes ZMQ drop the connection it came on; like any lost connection, that is
    counted (``stats.disconnects``) and logged, and a connecting subscriber connects anew
    (:mod:`~wirebus.transport._watch`).

    ``heartbeat`` and ``curve`` as for :class:`~wirebus.ZmqMessagePublisher`. A CURVE server
    with ``allowed_clients`` gets a private ZMQ context (its ZAP authenticator needs one),
    closed with the subscriber.

    ``recover=True`` fills a gap from a publisher with replay on from its replay buffer before
    that publisher's later items reach :meth:`process`; ``history=N`` fetches, on the first
    message of a publisher, the newest ``N`` items of each of its topics, in the order sent. A
    recovery gives up, counting what is still missing as dropped, when the publisher has not
    answered for ``recover_timeout`` s or its later messages held back meanwhile pass
    ``recover_max_bytes`` (``docs/pubsub.md``). Recovery needs an event loop (not
    :meth:`receive_blocking`).

    ``resume`` continues where an earlier subscriber stopped: pass the :attr:`position` it had
    when it last stored its work, and items from there on are due instead of ``history``. With
    ``recover=True``, on the first message of each publisher in it, everything that publisher
    still keeps after the position is fetched, every topic in the order sent (a later message
    shows no gap for items lost at the end of a topic); without, a gap is counted as dropped.
    With ``resume_endpoints`` (an earlier subscriber's :attr:`replay_endpoints`) that catch-up
    starts at once, instead of on the publisher's next message.
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
        recover: bool = False,
        history: int = 0,
        recover_timeout: float = 2.0,
        recover_max_bytes: int = 64 * 1024 * 1024,
        resume: Mapping[tuple[int, bytes], int] | None = None,
        resume_endpoints: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(conflate=conflate)
        _check_recovery(recover, history, recover_timeout, recover_max_bytes, conflate)
        if resume is not None and not isinstance(resume, Mapping):
            raise TypeError(f"resume must be a mapping (a subscriber's position), got {resume!r}")
        if resume_endpoints is not None and not (
            isinstance(resume_endpoints, Mapping)
            and all(isinstance(p, int) and isinstance(e, str) for p, e in resume_endpoints.items())
        ):
            raise TypeError(
                "resume_endpoints must map publisher ids to replay endpoints (a subscriber's "
                f"replay_endpoints), got {resume_endpoints!r}"
            )
        check_codec(codec)
        if isinstance(topics, (str, bytes)):
            raise TypeError(f"topics must be an iterable of topic names, not {topics!r}")
        filters = [_topic_filter(topic) for topic in topics]
        if not filters:
            raise ValueError("topics must name at least one topic (b'' for every topic)")
        if not isinstance(rcvhwm, int) or rcvhwm < 0:
            raise ValueError(f"rcvhwm must be >= 0 (0: no limit), got {rcvhwm!r}")
        self.codec = codec
        self.stats = SubscriberStats()
        self._decoder = FrameDecoder(codec, self.stats, conflate)
        if resume:
            self._decoder.resume(resume)
        self._frames: collections.deque[bytes] = collections.deque()
        self._newest: dict[bytes, bytes] = {}  # conflate: publisher id -> its newest frame
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocking = False  # receive_blocking() reads: no event loop may
        self._task: asyncio.Task[None] | None = None  # the consumer, once it had to wait
        self._consuming = False
        self._reading = False
        options: list[tuple[int, int | bytes]] = [
            (zmq.LINGER, 0),
            (zmq.RCVHWM, rcvhwm),
            (zmq.MAXMSGSIZE, max_message_size),
        ]
        if conflate:
            options.append((zmq.CONFLATE, 1))
        options += [(zmq.SUBSCRIBE, topic) for topic in filters]
        self._owned = OwnedSocket(
            zmq.SUB,
            address,
            bind=not connect,
            context=context,
            private_context=False,
            options=options,
            curve=curve,
            heartbeat=heartbeat,
            allow_any_interface=allow_any_interface,
            owner=f"subscriber for {address}",
        )
        self.address = self._owned.address
        self._socket = self._owned.socket
        self._watch = ConnectionWatch(
            self._socket, self.address, connect, self.stats, f"subscriber for {self.address}"
        )
        self._fd = cast(int, self._socket.getsockopt(zmq.FD))
        self._recovery: Recovery[T] | None = None
        if recover or history:
            self._recovery = Recovery(
                self._decoder,
                self.stats,
                recover=recover,
                history=history,
                timeout=recover_timeout,
                max_held_bytes=recover_max_bytes,
                context=self._owned.context,
                curve=curve,
                main_address=self.address if connect else None,
                kick=self._kick,
                owner=f"subscriber for {self.address}",
                resume=resume or {},
                endpoints=resume_endpoints or {},
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({safe_repr(self.codec)}, {self.address!r})"

    @property
    def position(self) -> Position:
        """Per (publisher id, topic) heard: the sequence number of the next item due.

        Every earlier item of that publisher and topic has been handed to :meth:`process`
        (or counted as dropped), so read inside or after :meth:`process` it says exactly what
        the items handed over so far cover. A consumer that stores its work stores this with
        it, and a later subscriber passes it as ``resume`` to go on from there, exactly once.
        """
        return self._decoder.position()

    @property
    def replay_endpoints(self) -> dict[int, str]:
        """The replay endpoint each publisher heard announced (with ``recover`` or
        ``history``; else empty). Stored with :attr:`position` and passed back as
        ``resume_endpoints``, it lets a resumed subscriber catch up at once, even on a publisher
        that sends nothing more."""
        return {} if self._recovery is None else self._recovery.endpoints()

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError(f"start() on closed {self!r}")
        if self._blocking:
            raise RuntimeError(f"start() on {self!r}, which receive_blocking() reads")
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self._recovery is not None:
            self._recovery.start(self._loop)
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self._loop.add_reader(self._watch.fd, self._on_monitor)
        self._loop.call_soon(self._on_monitor)  # events before start() took the FD's edge
        self._resume_reading()

    # -- the reader --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        """Drain the edge-triggered FD to EAGAIN, every time, or it is never woken again."""
        if self._closed:
            return  # scheduled by start() or resume, but closed before it ran
        recv = self._socket.recv
        if self._conflate:
            newest = self._newest
            try:
                while True:
                    frame = recv(zmq.NOBLOCK)
                    newest[frame[_wire.PUBLISHER_ID]] = frame  # older ones show up as gaps
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
                # One frame per wake-up is the common case: asking EVENTS re-arms the edge as
                # EAGAIN does, for the same system calls but without raising zmq.Again.
                if cast(int, self._socket.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
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

    def _on_monitor(self) -> None:
        if self._closed:
            return  # scheduled by start(), but closed before it ran
        self._watch.read()
        if self._watch.due is not None and self._loop is not None:
            self._loop.call_at(
                self._loop.time() + self._watch.due - time.monotonic(), self._reconnect
            )

    def _reconnect(self) -> None:
        if not self._closed:
            self._watch.reconnect_if_due()

    def _pause_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _resume_reading(self) -> None:
        if not self._reading and self._loop is not None and not self._closed:
            self._loop.add_reader(self._fd, self._on_readable)
            self._reading = True
            self._loop.call_soon(self._on_readable)  # the edge may have come and gone

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
            self._recovery.deliver(items, failures, frames)
            end = stats.received + stats.malformed + _ITEMS_PER_BATCH
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
            for _ in range(_MAX_BUFFERED_FRAMES):
                frame = recv(zmq.NOBLOCK)
                if self._conflate:
                    self._newest[frame[_wire.PUBLISHER_ID]] = frame
                else:
                    self._frames.append(frame)
        except zmq.Again:
            pass
        while self._frames or self._newest:
            _run_now(self._deliver_batch(), self)

    # -- closing -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pause_reading()
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._watch.fd)
        if self._task is not None:
            self._task.cancel()
        if self._recovery is not None:
            self._recovery.close()
        self._watch.close()
        self._owned.close(linger=0)
        self._wake_receivers()

    async def aclose(self) -> None:
        task = self._task
        self.close()
        if task is not None and task is not asyncio.current_task():
            await asyncio.gather(task, return_exceptions=True)


def _check_recovery(
    recover: bool, history: int, timeout: float, max_bytes: int, conflate: bool
) -> None:
    if not isinstance(recover, bool):
        raise TypeError(f"recover must be a bool, got {recover!r}")
    if isinstance(history, bool) or not isinstance(history, int) or history < 0:
        raise ValueError(f"history must be an int >= 0 items (0: none), got {history!r}")
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"recover_timeout must be > 0 s, got {timeout!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"recover_max_bytes must be an int >= 1, got {max_bytes!r}")
    if conflate and (recover or history):
        raise ValueError(
            "recover or history with conflate=True: a conflating subscriber skips items on purpose"
        )


def _topic_filter(topic: str | bytes) -> bytes:
    """``""``/``b""`` subscribes to every topic; anything else to that exact (padded) topic."""
    if topic in (b"", ""):
        return b""
    return make_topic(topic)


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
