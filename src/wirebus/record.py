"""Event records: what a load generator says happened, and their codec.

Every event type belongs to one category — session, sample or error — and the category is the
record's topic, so a subscriber can take one category only (``topics=[SAMPLE_TOPIC]``).
Records are msgpack maps (never ``array_like``): a decoder ignores fields it does not know, so
adding an optional field never breaks an older reader.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any, Union

import msgspec

from wirebus.codec import MsgspecCodec, RunEncoding, make_topic

__all__ = [
    "ERROR_TOPIC",
    "SAMPLE_TOPIC",
    "SESSION_TOPIC",
    "ErrorData",
    "ErrorEventType",
    "EventRecord",
    "EventRecordCodec",
    "EventType",
    "PromptData",
    "SampleEventType",
    "SessionEventType",
    "TextModelOutput",
]

SESSION_TOPIC = make_topic("session")
SAMPLE_TOPIC = make_topic("sample")
ERROR_TOPIC = make_topic("error")


class EventType:
    """Common base of the three event-type enums; its ``topic`` is the category's topic.

    On the wire an event type is its string value, ``"<category>.<name>"`` (e.g.
    ``"sample.issued"``), unique across all three enums.
    """

    __slots__ = ()
    topic: bytes


class SessionEventType(EventType, str, enum.Enum):
    """Events of a whole benchmark session."""

    STARTED = "session.started"
    START_PERFORMANCE_TRACKING = "session.start_performance_tracking"
    STOP_PERFORMANCE_TRACKING = "session.stop_performance_tracking"
    ENDED = "session.ended"


class SampleEventType(EventType, str, enum.Enum):
    """Events in the life of one sample (one request)."""

    ISSUED = "sample.issued"
    FIRST_CHUNK = "sample.first_chunk"
    CHUNK = "sample.chunk"
    COMPLETE = "sample.complete"


class ErrorEventType(EventType, str, enum.Enum):
    """Errors: ``GENERIC`` also stands for a payload that could not be decoded."""

    GENERIC = "error.generic"
    SAMPLE_FAILED = "error.sample_failed"
    SESSION_FAILED = "error.session_failed"


for _enum, _topic in (
    (SessionEventType, SESSION_TOPIC),
    (SampleEventType, SAMPLE_TOPIC),
    (ErrorEventType, ERROR_TOPIC),
):
    for _member in _enum:
        _member.topic = _topic

_EVENT_TYPES: dict[str, EventType] = {
    m.value: m for e in (SessionEventType, SampleEventType, ErrorEventType) for m in e
}

if TYPE_CHECKING:
    AnyEventType = Union[SessionEventType, SampleEventType, ErrorEventType]  # noqa: UP007
else:
    # msgspec cannot decode a union of str enums; it sees the common base and hands the value
    # to EventRecordCodec's dec_hook, which looks the string up in _EVENT_TYPES.
    AnyEventType = EventType


class ErrorData(msgspec.Struct, tag="error", omit_defaults=True):
    """What went wrong: the exception class name and its message."""

    error_type: str
    error_message: str


class PromptData(msgspec.Struct, tag="prompt", omit_defaults=True):
    """The prompt of an issued sample, as text or token ids."""

    text: str | None = None
    token_ids: list[int] | None = None


class TextModelOutput(msgspec.Struct, tag="output", omit_defaults=True):
    """What the model produced for a sample (or one chunk of it)."""

    text: str | None = None
    n_tokens: int | None = None


class EventRecord(msgspec.Struct, omit_defaults=True, frozen=True):
    """One event: its type, when it happened (``time.monotonic_ns()``), which sample, details.

    Frozen: a publisher may encode a record after ``publish()`` returned, so it cannot change
    in between.
    """

    event_type: AnyEventType
    timestamp_ns: int = msgspec.field(default_factory=time.monotonic_ns)
    sample_uuid: str = ""
    data: ErrorData | PromptData | TextModelOutput | None = None


class EventRecordCodec(MsgspecCodec[EventRecord]):
    """Codec for :class:`EventRecord`; the topic is the event type's category.

    A payload that is not a valid record (``msgspec.DecodeError`` or ``ValidationError``)
    decodes to ``EventRecord(ErrorEventType.GENERIC, data=ErrorData(<class name>, <message>))``;
    any other exception is re-raised.
    """

    def __init__(self) -> None:
        super().__init__(EventRecord, topic=_topic_of)
        self._encode_payload = self._encoder.encode

    def encode(self, item: EventRecord) -> tuple[bytes, bytes]:
        return item.event_type.topic, self._encode_payload(item)

    def topic(self, item: EventRecord) -> bytes:
        if item.__class__ is not EventRecord and not isinstance(item, EventRecord):
            raise TypeError(f"{self!r} encodes EventRecord, got {type(item).__name__}: {item!r}")
        return item.event_type.topic

    def run_encoding(self) -> RunEncoding[EventRecord]:
        return RunEncoding(self.topic, self._encoder.encode)

    def _dec_hook(self, type_: type[Any], obj: Any) -> Any:
        if type_ is EventType:
            try:
                return _EVENT_TYPES[obj]
            except (KeyError, TypeError):
                raise ValueError(f"unknown event type {obj!r}") from None
        return super()._dec_hook(type_, obj)

    def on_decode_error(self, payload: bytes | memoryview, exc: Exception) -> EventRecord:
        if not isinstance(exc, msgspec.DecodeError):  # ValidationError is a DecodeError
            raise exc
        return EventRecord(
            event_type=ErrorEventType.GENERIC,
            data=ErrorData(error_type=type(exc).__name__, error_message=str(exc)),
        )


def _topic_of(record: EventRecord) -> bytes:
    return record.event_type.topic
