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
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, cast

import zmq

from wirebus.codec import MessageCodec, check_codec, make_topic
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _wire
from wirebus.transport._base import safe_repr
from wirebus.transport._consumer import MAX_BUFFERED_FRAMES, Consumer
from wirebus.transport._decoder import FrameDecoder, Position, SubscriberStats
from wirebus.transport._recovery import Recovery
from wirebus.transport._socket import OwnedSocket
from wirebus.transport._watch import ConnectionWatch

T = TypeVar("T")

_DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024


class ZmqMessageSubscriber(Consumer[T]):
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
        _check_resume(resume, resume_endpoints)
        check_codec(codec)
        options = _socket_options(topics, rcvhwm, conflate, max_message_size)
        self.codec = codec
        self.stats = SubscriberStats()
        self._decoder = FrameDecoder(codec, self.stats, conflate)
        if resume:
            self._decoder.resume(resume)
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
                        if len(frames) >= MAX_BUFFERED_FRAMES:
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


def _check_resume(
    resume: Mapping[tuple[int, bytes], int] | None, endpoints: Mapping[int, str] | None
) -> None:
    if resume is not None and not isinstance(resume, Mapping):
        raise TypeError(f"resume must be a mapping (a subscriber's position), got {resume!r}")
    if endpoints is not None and not (
        isinstance(endpoints, Mapping)
        and all(isinstance(p, int) and isinstance(e, str) for p, e in endpoints.items())
    ):
        raise TypeError(
            "resume_endpoints must map publisher ids to replay endpoints (a subscriber's "
            f"replay_endpoints), got {endpoints!r}"
        )


def _socket_options(
    topics: Iterable[str | bytes], rcvhwm: int, conflate: bool, max_message_size: int
) -> list[tuple[int, int | bytes]]:
    """The SUB socket's options; ``TypeError``/``ValueError`` for topics or an hwm that
    cannot be."""
    if isinstance(topics, (str, bytes)):
        raise TypeError(f"topics must be an iterable of topic names, not {topics!r}")
    filters = [_topic_filter(topic) for topic in topics]
    if not filters:
        raise ValueError("topics must name at least one topic (b'' for every topic)")
    if not isinstance(rcvhwm, int) or rcvhwm < 0:
        raise ValueError(f"rcvhwm must be >= 0 (0: no limit), got {rcvhwm!r}")
    options: list[tuple[int, int | bytes]] = [
        (zmq.LINGER, 0),
        (zmq.RCVHWM, rcvhwm),
        (zmq.MAXMSGSIZE, max_message_size),
    ]
    if conflate:
        options.append((zmq.CONFLATE, 1))
    return options + [(zmq.SUBSCRIBE, topic) for topic in filters]


def _topic_filter(topic: str | bytes) -> bytes:
    """``""``/``b""`` subscribes to every topic; anything else to that exact (padded) topic."""
    if topic in (b"", ""):
        return b""
    return make_topic(topic)
