"""The transport-agnostic interfaces users subclass, and the log helpers both sides share."""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Generic, TypeVar

from wirebus._resource import Resource

T = TypeVar("T")
_Sub = TypeVar("_Sub", bound="MessageSubscriber[Any]")

logger = logging.getLogger("wirebus.transport")


def safe_repr(obj: object) -> str:
    """``repr(obj)``, or a stand-in naming its type when that ``repr`` raises."""
    try:
        return repr(obj)
    except Exception as exc:
        return f"<{type(obj).__name__} object (repr raised {type(exc).__name__})>"


class LastOneOut:
    """Releases a thread's resources (its wake pipe, its socket) once, whoever is last: the
    thread that stops it, if the thread ended within the stopper's timeout, or else the thread
    itself as it ends. So a ``close(timeout)`` that cannot wait leaks nothing."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._lock = threading.Lock()
        self._ended = False
        self._orphaned = False

    def run(self, serve: Callable[[], None]) -> None:
        """The thread's target: ``serve``, then, as the thread ends, :meth:`thread_ends`."""
        try:
            serve()
        finally:
            self.thread_ends()

    def thread_ends(self) -> None:
        """Called by the thread, last thing it does."""
        with self._lock:
            self._ended = True
            if not self._orphaned:
                return
        self._release()

    def stopper_waited(self) -> bool:
        """Called by the stopper after its join: True when it released (the thread ended),
        False when the thread will, as it ends."""
        with self._lock:
            if not self._ended:
                self._orphaned = True
                return False
        self._release()
        return True


class RateLimitedLog:
    """Logs at most ``burst`` messages per ``period`` seconds; says how many it held back.

    Messages are formatted by the caller (with :func:`safe_repr`), so logging itself never
    formats a ``%r`` that could raise.
    """

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self._burst = burst
        self._period = period
        self._window = -period
        self._logged = 0
        self._suppressed = 0

    def __call__(self, level: int, message: str, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        if now - self._window >= self._period:
            if self._suppressed:
                logger.log(level, "%d similar message(s) suppressed", self._suppressed)
            self._window, self._logged, self._suppressed = now, 0, 0
        if self._logged >= self._burst:
            self._suppressed += 1
            return
        self._logged += 1
        try:
            logger.log(level, "%s", message, exc_info=exc)
        except Exception:  # a handler that fails must not take the caller down with it
            logger.log(level, "%s (traceback not shown: formatting it failed)", message)


class MessagePublisher(Resource, Generic[T]):
    """Publishes items of type ``T``; transport-agnostic. ``with``/``async with`` close it."""

    @abstractmethod
    def publish(self, item: T) -> None:
        """Queue ``item`` for sending. Never blocks; safe with or without a running loop."""

    def publish_many(self, items: Iterable[T]) -> None:
        """Queue ``items`` in order, as :meth:`publish` would one by one."""
        for item in items:
            self.publish(item)

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
        self._started = False
        self._conflate = conflate
        self._error_log = RateLimitedLog()

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

        Only meaningful while :meth:`process` is the default one. ``RuntimeError`` when the
        subscriber was never started (use ``async with`` or ``await start()``) or is closed.
        """
        while not self._received:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if not self._started:
                raise RuntimeError(
                    f"{self!r} was never started: use 'async with' or 'await start()' "
                    "before receive() or 'async for'"
                )
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
        logs the exception with its traceback, at most a few times in ten seconds (with a count
        of what it held back). Reading goes on either way.
        """
        self._error_log(logging.ERROR, f"{safe_repr(self)}: {safe_repr(exc)}", exc)

    async def __aenter__(self: _Sub) -> _Sub:
        """Start receiving (``async with`` closes on exit)."""
        await self.start()
        return self
