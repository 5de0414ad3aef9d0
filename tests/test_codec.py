from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _support import Tick
from wirebus import (
    TOPIC_FRAME_SIZE,
    ErrorData,
    ErrorEventType,
    EventRecord,
    EventRecordCodec,
    MsgspecCodec,
    PromptData,
    SampleEventType,
    SessionEventType,
    TextModelOutput,
    make_topic,
)
from wirebus.codec import check_codec, run_decoder_of, run_encoding_of
from wirebus.record import ERROR_TOPIC, SAMPLE_TOPIC, SESSION_TOPIC


def test_make_topic_pads_to_fixed_width() -> None:
    assert make_topic("abc") == b"abc" + b"\0" * (TOPIC_FRAME_SIZE - 3)
    assert make_topic(b"x" * TOPIC_FRAME_SIZE) == b"x" * TOPIC_FRAME_SIZE
    assert make_topic(make_topic("abc")) == make_topic("abc")


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("", ValueError, "empty"),
        (b"", ValueError, "empty"),
        (b"\0" * 4, ValueError, "empty"),
        ("x" * (TOPIC_FRAME_SIZE + 1), ValueError, "x" * (TOPIC_FRAME_SIZE + 1)),
        ("a\0b", ValueError, "NUL"),
        (42, TypeError, "42"),
    ],
)
def test_make_topic_rejects_bad_names(name: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        make_topic(name)  # type: ignore[arg-type]


def test_msgspec_codec_round_trip_and_fixed_topic() -> None:
    codec = MsgspecCodec(Tick, topic="tick")
    topic, payload = codec.encode(Tick(3, 1.5))
    assert topic == make_topic("tick")
    assert codec.decode(payload) == Tick(3, 1.5)
    assert codec.decode(memoryview(payload)) == Tick(3, 1.5)


def test_msgspec_codec_topic_function() -> None:
    odd, even = make_topic("odd"), make_topic("even")
    codec = MsgspecCodec(Tick, topic=lambda t: odd if t.seq % 2 else even)
    assert codec.encode(Tick(1))[0] == odd
    assert codec.encode(Tick(2))[0] == even


def test_msgspec_codec_reraises_decode_errors() -> None:
    codec = MsgspecCodec(Tick, topic="tick")
    with pytest.raises(msgspec.DecodeError) as info:
        codec.decode(b"\xc1garbage")
    with pytest.raises(msgspec.DecodeError):
        codec.on_decode_error(b"\xc1garbage", info.value)


def test_check_codec_names_the_offender() -> None:
    check_codec(EventRecordCodec())
    with pytest.raises(TypeError, match=r"42 is not a MessageCodec.*encode, decode, on_decode"):
        check_codec(42)
    with pytest.raises(TypeError, match=r"'text'.*no callable decode, on_decode_error$"):
        check_codec("text")


@pytest.mark.parametrize(
    ("event_type", "topic"),
    [
        (SessionEventType.STARTED, SESSION_TOPIC),
        (SampleEventType.COMPLETE, SAMPLE_TOPIC),
        (ErrorEventType.SAMPLE_FAILED, ERROR_TOPIC),
    ],
)
def test_event_record_topic_is_its_category(event_type: object, topic: bytes) -> None:
    codec = EventRecordCodec()
    assert codec.encode(EventRecord(event_type))[0] == topic  # type: ignore[arg-type]


def test_event_record_default_timestamp_is_monotonic_now() -> None:
    first, second = EventRecord(SampleEventType.ISSUED), EventRecord(SampleEventType.ISSUED)
    assert 0 < first.timestamp_ns <= second.timestamp_ns


def test_event_record_decode_tolerates_added_fields() -> None:
    newer = {
        "event_type": "sample.complete",
        "timestamp_ns": 5,
        "sample_uuid": "u",
        "data": {"type": "output", "n_tokens": 7, "finish_reason": "stop"},
        "added_in_v2": [1, 2, 3],
    }
    record = EventRecordCodec().decode(msgspec.msgpack.encode(newer))
    assert record == EventRecord(
        SampleEventType.COMPLETE, timestamp_ns=5, sample_uuid="u", data=TextModelOutput(n_tokens=7)
    )


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        (b"\xc1not msgpack", "DecodeError"),
        (msgspec.msgpack.encode({"event_type": "sample.nope"}), "ValidationError"),
        (msgspec.msgpack.encode({"timestamp_ns": 1}), "ValidationError"),
    ],
)
def test_event_record_codec_wraps_decode_errors(payload: bytes, error_type: str) -> None:
    codec = EventRecordCodec()
    with pytest.raises(msgspec.DecodeError) as info:
        codec.decode(payload)
    wrapped = codec.on_decode_error(payload, info.value)
    assert wrapped.event_type is ErrorEventType.GENERIC
    assert wrapped.data == ErrorData(error_type=error_type, error_message=str(info.value))


def test_event_record_codec_reraises_other_errors() -> None:
    bug = KeyError("not a decode problem")
    with pytest.raises(KeyError) as info:
        EventRecordCodec().on_decode_error(b"", bug)
    assert info.value is bug


_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_event_types = st.sampled_from([*SessionEventType, *SampleEventType, *ErrorEventType])
_data = st.one_of(
    st.none(),
    st.builds(ErrorData, error_type=st.text(), error_message=st.text()),
    st.builds(
        PromptData,
        text=st.none() | st.text(),
        token_ids=st.none() | st.lists(_int64, max_size=20),
    ),
    st.builds(TextModelOutput, text=st.none() | st.text(), n_tokens=st.none() | _int64),
)
_records = st.builds(
    EventRecord, event_type=_event_types, timestamp_ns=_int64, sample_uuid=st.text(), data=_data
)


@given(_records)
def test_any_event_record_round_trips(record: EventRecord) -> None:
    codec = EventRecordCodec()
    topic, payload = codec.encode(record)
    assert len(topic) == TOPIC_FRAME_SIZE
    assert codec.decode(payload) == record


def test_a_run_encodes_and_decodes_in_one_call_as_one_msgpack_array() -> None:
    codec = MsgspecCodec(Tick, topic="tick")
    encoding, decode_run = run_encoding_of(codec), run_decoder_of(codec)
    assert encoding is not None
    assert decode_run is not None
    for count in (1, 15, 16, 128):
        ticks = [Tick(i) for i in range(count)]
        body = encoding.encode(ticks)
        assert decode_run(body) == ticks
        # each element is exactly the payload encode() gives: a peer may split the array
        elements = msgspec.msgpack.decode(body, type=list[msgspec.Raw])
        assert [bytes(e) for e in elements] == [codec.encode(t)[1] for t in ticks]
    records = [EventRecord(SampleEventType.CHUNK, timestamp_ns=i) for i in range(20)]
    event_codec = EventRecordCodec()
    event_encoding, decode_records = run_encoding_of(event_codec), run_decoder_of(event_codec)
    assert event_encoding is not None
    assert decode_records is not None
    assert decode_records(event_encoding.encode(records)) == records
    assert event_encoding.topic(records[0]) == SampleEventType.CHUNK.topic


def test_run_encoding_steps_aside_for_an_overridden_encode_or_decode() -> None:
    class Doubling(MsgspecCodec[Tick]):
        def decode(self, payload: bytes | memoryview) -> Tick:
            return Tick(super().decode(payload).seq * 2)

    class Shouting(MsgspecCodec[Tick]):
        def encode(self, item: Tick) -> tuple[bytes, bytes]:
            return super().encode(Tick(item.seq + 1))

    assert run_decoder_of(Doubling(Tick, topic="tick")) is None
    assert run_encoding_of(Doubling(Tick, topic="tick")) is not None
    assert run_encoding_of(Shouting(Tick, topic="tick")) is None
    assert run_decoder_of(Shouting(Tick, topic="tick")) is not None


class Quote(msgspec.Struct, tag="quote"):
    bid: float


class Trade(msgspec.Struct, tag="trade"):
    price: float


def test_a_union_of_tagged_structs_is_one_codec_with_a_repr_that_works() -> None:
    """Two message types on one socket: the natural way, and its repr must not raise."""
    codec: MsgspecCodec[Quote | Trade] = MsgspecCodec(Quote | Trade, topic="market")
    assert "Quote" in repr(codec)
    assert "Trade" in repr(codec)
    for item in (Quote(1.0), Trade(2.0)):
        assert codec.decode(codec.encode(item)[1]) == item
        assert codec.topic(item) == make_topic("market")
    with pytest.raises(TypeError, match=r"got Tick: Tick\(seq=1"):
        codec.topic(Tick(1))  # type: ignore[arg-type]
