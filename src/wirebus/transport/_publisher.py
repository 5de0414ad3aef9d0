"""The ZeroMQ publisher: ``publish()`` checks and queues, a state for its life, closing.

What ``publish()`` accepts and the entry it queues is :mod:`~wirebus.transport._intake`'s
business, who sends the queue :mod:`~wirebus.transport._sender`'s (the publisher is a
:class:`~wirebus.transport._sender.Dispatcher`), how a run becomes a message
:mod:`~wirebus.transport._sendstep`'s.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from wirebus.codec import (
    TOPIC_FRAME_SIZE,
    MessageCodec,
    check_codec,
    run_encoding_of,
)
from wirebus.security import CurveClient, CurveServer
from wirebus.transport import _intake, _replay, _wire
from wirebus.transport._base import MessagePublisher, RateLimitedLog, safe_repr
from wirebus.transport._sender import LOOP, Dispatcher, time_left
from wirebus.transport._sendstep import SendStep
from wirebus.transport._socket import OwnedSocket

T = TypeVar("T")

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
_MAX_ITEMS = _wire.MAX_ITEMS


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


class ZmqMessagePublisher(Dispatcher, MessagePublisher[T]):
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

    ``replay=N`` keeps the newest ``N`` items of each topic (whole messages, at most
    ``replay_bytes`` bytes per topic) and serves them to subscribers that missed them on
    :attr:`replay_address` (``None``: picked next to ``address``), a ROUTER socket with the
    same security settings; every message then tells subscribers that endpoint
    (``docs/pubsub.md``, ``docs/wire-format.md``).
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
        replay: int = 0,
        replay_address: str | None = None,
        replay_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        check_codec(codec)
        _check_settings(linger, sndhwm, max_batch_bytes)
        _replay.check_settings(replay, replay_bytes, conflate, curve)
        self.codec = codec
        self._run_encoding = run_encoding = run_encoding_of(codec)
        self._topic_of, self._item_type, self._fixed_topic = _intake.shortcuts(run_encoding)
        self._linger = linger
        self.publisher_id = int.from_bytes(os.urandom(8), "little")
        self._published = 0
        self._state = _OPEN
        self._failure: Exception | None = None
        self._state_lock = threading.Lock()
        self._error_log = RateLimitedLog()
        self._owned = _xpub(
            address, bind, context, sndhwm, linger, immediate, curve, heartbeat, allow_any_interface
        )
        self.address = self._owned.address
        self._replay: _replay.ReplayServer | None = None
        if replay:
            try:
                self._replay = _replay.ReplayServer.next_to(
                    self._owned, replay_address, bind, self.publisher_id, replay, replay_bytes
                )
            except BaseException:
                self._owned.close(linger=0)
                raise
        self.replay_address = None if self._replay is None else self._replay.address
        step = SendStep(
            self._owned.socket,
            self.publisher_id,
            codec,
            run_encoding,
            conflate,
            max_batch_bytes,
            self.on_error,
            safe_repr(self),
            self._replay,
        )
        self._start_dispatch(step, f"wirebus-publisher {self.address}")
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
        item_type = self._item_type
        if item_type is not None and item.__class__ is not item_type:
            _intake.check_type(self.codec, item_type, item)
        topic = self._fixed_topic
        if topic is None:
            topic_of = self._topic_of
            if topic_of is None:
                topic, item = _intake.encode_now(self.codec, item)
            else:
                topic = topic_of(item)
                if topic.__class__ is not bytes or len(topic) != TOPIC_FRAME_SIZE:
                    raise _intake.bad_topic(self.codec, item, topic)
        queue = self._queue
        queue.append((topic, item))
        self._published += 1
        if len(queue) >= _MAX_ITEMS:
            self._send_now()  # a full message's worth: no need to wait
        elif self._due is not LOOP:
            self._schedule()
        elif not self._writer.ticking:
            self._wait_for_the_loop()

    def publish_many(self, items: Iterable[T]) -> None:
        """Queue ``items`` in order in one call; every check of :meth:`publish` runs first, so
        a bad item leaves none of them queued."""
        if self._state is not _OPEN:
            raise self._refusal("publish_many()")
        entries = _intake.entries(self.codec, self._run_encoding, items)
        if not entries:
            return
        queue = self._queue
        queue.extend(entries)
        self._published += len(entries)
        if len(queue) >= _MAX_ITEMS:
            self._send_now()
        elif self._due is not LOOP:
            self._schedule()
        elif not self._writer.ticking:
            self._wait_for_the_loop()

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

    def _socket_closed(self) -> bool:
        return bool(self._owned.socket.closed)

    def _closing(self) -> bool:
        return self._state in (_State.CLOSING, _State.CLOSED)

    def _refusing(self) -> bool:
        return self._state is not _OPEN

    def _send_failed(self, exc: Exception) -> None:
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

    def close(self, timeout: float | None = None) -> None:
        """Send everything pending, then close the socket; idempotent and thread-safe.

        Delivery waits up to ``linger`` ms (``-1``: until delivered), and at most ``timeout``
        seconds when given: whatever happens in the send step, ``close`` returns by then
        (what is not sent by then is dropped, and logged). It cannot be called from inside the
        send step (an ``on_error``): that raises ``RuntimeError``.
        """
        if self._sending_thread == threading.get_ident():
            raise RuntimeError(
                f"close() on {self!r} from inside its send step (on_error?): close it after"
            )
        if not self._set_state(_State.CLOSING, only_from=(_OPEN, _State.FAILED)):
            return
        deadline = None if timeout is None else time.monotonic() + max(0.0, timeout)
        try:
            self._stop_sending(deadline, self._linger)
        finally:
            if self._replay is not None:  # whatever became of the main socket
                self._replay.close(time_left(deadline))
            self._set_state(_State.CLOSED, only_from=_State.CLOSING)
            self._settle_flushes(closed=True)
            _live_publishers.discard(self)

    def _close_socket(self, linger: int) -> None:
        self._owned.close(linger)


def _check_settings(linger: int, sndhwm: int, max_batch_bytes: int) -> None:
    if not isinstance(linger, int) or linger < -1:
        raise ValueError(f"linger must be -1 (wait forever) or >= 0 ms, got {linger!r}")
    if not isinstance(sndhwm, int) or sndhwm < 0:
        raise ValueError(f"sndhwm must be >= 0 (0: no limit), got {sndhwm!r}")
    if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
        raise ValueError(f"max_batch_bytes must be >= 1, got {max_batch_bytes!r}")


def _xpub(
    address: str,
    bind: bool,
    context: zmq.Context[Any] | None,
    sndhwm: int,
    linger: int,
    immediate: bool,
    curve: CurveServer | CurveClient | None,
    heartbeat: int,
    allow_any_interface: bool,
) -> OwnedSocket:
    """The publisher's XPUB socket; verbose, so that every subscription reaches the count
    (``wait_for_subscribers``). A private context unless inproc (which needs the peer's), so
    that closing it waits for delivery."""
    return OwnedSocket(
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
