"""The load side: emit a benchmark's event records without touching codecs or sockets.

::

    async with EventPublisherService(address) as events:   # or a plain ``with``
        await events.wait_for_subscribers(2, timeout=10)
        events.session_started()
        events.issued(uuid)
        events.first_chunk(uuid)
        events.complete(uuid, n_tokens=42)
        events.session_ended()
"""

from __future__ import annotations

from typing import Any

import zmq

from wirebus._resource import Resource
from wirebus.record import (
    ErrorData,
    ErrorEventType,
    EventRecord,
    EventRecordCodec,
    PromptData,
    SampleEventType,
    SessionEventType,
    TextModelOutput,
)
from wirebus.transport import PublisherStats, ZmqMessagePublisher

__all__ = ["REPLAY_ITEMS", "EventPublisherService"]

REPLAY_ITEMS = 100_000
"""Records of each event type an :class:`EventPublisherService` keeps for replay by default:
about 6.5 MB per type of 65-byte records (the publisher's ``replay_bytes``, 64 MiB per type,
caps it too), and what lets a restarted event logger or aggregator miss nothing."""


class EventPublisherService(Resource):
    """Publishes :class:`~wirebus.EventRecord` s for one benchmark session.

    Every method stamps the record with ``time.monotonic_ns()`` unless ``timestamp_ns`` is
    given, and returns at once (see :meth:`ZmqMessagePublisher.publish`). ``bind=False``
    connects to a bound subscriber instead (several load processes feeding one aggregator).
    ``address`` is the endpoint actually bound; ``published`` counts the records emitted.
    ``replay`` records of each event type (default :data:`REPLAY_ITEMS`; ``0``: off) are kept
    for subscribers that missed them, served on ``replay_address`` (picked next to
    ``address`` unless given; see :class:`~wirebus.ZmqMessagePublisher`). Close it with
    :meth:`close` / :meth:`aclose` or use it as a context manager (``with`` or ``async with``):
    what was published is sent first.
    """

    def __init__(
        self,
        address: str,
        *,
        bind: bool = True,
        context: zmq.Context[Any] | None = None,
        replay: int = REPLAY_ITEMS,
        replay_address: str | None = None,
    ) -> None:
        self._publisher = ZmqMessagePublisher(
            EventRecordCodec(),
            address,
            bind=bind,
            context=context,
            replay=replay,
            replay_address=replay_address,
        )
        self.address = self._publisher.address
        self.replay_address = self._publisher.replay_address
        self.published = 0

    @property
    def stats(self) -> PublisherStats:
        """The underlying publisher's counters (published, sent, pending, ...)."""
        return self._publisher.stats

    def _emit(self, record: EventRecord) -> None:
        self._publisher.publish(record)
        self.published += 1

    def _record(
        self,
        event_type: SessionEventType | SampleEventType | ErrorEventType,
        uuid: str,
        data: ErrorData | PromptData | TextModelOutput | None,
        timestamp_ns: int | None,
    ) -> None:
        if timestamp_ns is None:
            self._emit(EventRecord(event_type, sample_uuid=uuid, data=data))
        else:
            self._emit(EventRecord(event_type, timestamp_ns, uuid, data))

    def session_started(self, *, timestamp_ns: int | None = None) -> None:
        """The benchmark session starts (``elapsed_s`` counts from here)."""
        self._record(SessionEventType.STARTED, "", None, timestamp_ns)

    def start_tracking(self, *, timestamp_ns: int | None = None) -> None:
        """Samples issued from now on count toward the performance metrics."""
        self._record(SessionEventType.START_PERFORMANCE_TRACKING, "", None, timestamp_ns)

    def stop_tracking(self, *, timestamp_ns: int | None = None) -> None:
        """Samples issued from now on no longer count toward the performance metrics."""
        self._record(SessionEventType.STOP_PERFORMANCE_TRACKING, "", None, timestamp_ns)

    def session_ended(self, *, timestamp_ns: int | None = None) -> None:
        """The session is over (the event logger flushes its file)."""
        self._record(SessionEventType.ENDED, "", None, timestamp_ns)

    def issued(
        self, uuid: str, prompt: PromptData | None = None, *, timestamp_ns: int | None = None
    ) -> None:
        """Sample ``uuid`` was sent to the system under test, with its ``prompt`` if given."""
        self._record(SampleEventType.ISSUED, uuid, prompt, timestamp_ns)

    def first_chunk(
        self, uuid: str, text: str | None = None, *, timestamp_ns: int | None = None
    ) -> None:
        """The first chunk of sample ``uuid``'s answer arrived (time to first token)."""
        data = None if text is None else TextModelOutput(text=text)
        self._record(SampleEventType.FIRST_CHUNK, uuid, data, timestamp_ns)

    def chunk(self, uuid: str, text: str | None = None, *, timestamp_ns: int | None = None) -> None:
        """A later chunk of sample ``uuid``'s answer arrived."""
        data = None if text is None else TextModelOutput(text=text)
        self._record(SampleEventType.CHUNK, uuid, data, timestamp_ns)

    def complete(
        self,
        uuid: str,
        n_tokens: int,
        text: str | None = None,
        *,
        timestamp_ns: int | None = None,
    ) -> None:
        """Sample ``uuid`` completed with ``n_tokens`` output tokens (>= 0)."""
        output = TextModelOutput(text=text, n_tokens=n_tokens)
        self._record(SampleEventType.COMPLETE, uuid, output, timestamp_ns)

    def failed(
        self, uuid: str, error: BaseException | str, *, timestamp_ns: int | None = None
    ) -> None:
        """Sample ``uuid`` failed; ``error`` is the exception or a message."""
        if isinstance(error, BaseException):
            data = ErrorData(error_type=type(error).__name__, error_message=str(error))
        else:
            data = ErrorData(error_type="Error", error_message=error)
        self._record(ErrorEventType.SAMPLE_FAILED, uuid, data, timestamp_ns)

    async def wait_for_subscribers(self, count: int = 1, timeout: float | None = None) -> None:
        """Return once ``count`` subscribers listen (``TimeoutError`` after ``timeout`` s)."""
        await self._publisher.wait_for_subscribers(count, timeout)

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every record published so far is handed to ZeroMQ."""
        await self._publisher.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Send what is pending (within ``timeout`` s), then close; idempotent."""
        self._publisher.close(timeout)

    async def aclose(self, timeout: float | None = None) -> None:
        """:meth:`close` without blocking the event loop."""
        await self._publisher.aclose(timeout)
