"""The wire format: the only code that knows a wirebus message's bytes (docs/wire-format.md).

Every message is one ZMQ frame: the 32-byte topic, a 24-byte header, then the items' payloads
in one of two forms. The *table* form (flags 0) has one u32 length per item and the payloads
laid end to end; the *run* form (flag ``RUN``) is one msgpack array holding the items, what a
run-encoding codec produces in one call. A publisher with a replay buffer sets ``REPLAY`` and
puts its replay endpoint between the header and the body.

The replay protocol (a subscriber's DEALER to a publisher's ROUTER) is here too: a request
for a range of one topic's sequence numbers, and the replies (ordinary messages, an end
marker, or an error).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from wirebus.codec import TOPIC_FRAME_SIZE

WIRE_VERSION = 2
"""Version byte written by this release; version 1 (the table form only) is still read."""

FLAG_RUN = 0x01
"""Flags bit 0: the body is one msgpack array of ``count`` items, with no length table."""
FLAG_REPLAY = 0x02
"""Flags bit 1: a u16 length and the publisher's replay endpoint (UTF-8) precede the body."""
_KNOWN_FLAGS = FLAG_RUN | FLAG_REPLAY
MAX_ENDPOINT = 1024
"""The longest replay endpoint a message may carry, in bytes."""

MAX_ITEMS = 128
"""The most items one message carries (a reader refuses more)."""

# topic | version u8, flags u8, reserved u16, count u32, publisher id u64, first seq u64 | body
_HEADER = struct.Struct("<BBHIQQ")
HEADER_END = TOPIC_FRAME_SIZE + _HEADER.size
PUBLISHER_ID = slice(TOPIC_FRAME_SIZE + 8, TOPIC_FRAME_SIZE + 16)
"""Where the publisher id sits in a frame (a conflating reader keys frames by it)."""

_U16 = struct.Struct("<H")
_LENGTHS = [struct.Struct(f"<{n}I") for n in range(MAX_ITEMS + 1)]
_ARRAY_HEADERS = [
    bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big") for n in range(MAX_ITEMS + 1)
]


class MalformedFrame(ValueError):
    """A frame that is not a wirebus message; the text says why."""


class Frame(NamedTuple):
    """A parsed frame: ``items`` is the item count, ``lengths`` the length table (table form)
    or ``None`` (run form); the body starts at ``offset``."""

    topic: bytes
    publisher: int
    first: int
    items: int
    lengths: tuple[int, ...] | None
    offset: int
    replay: bytes = b""
    """The publisher's replay endpoint (flag ``REPLAY``), else empty."""


# Builds a Frame without NamedTuple's generated __new__, a Python call that took a third of
# unpack()'s time; unpack runs once per message on the subscriber's hot path.
_frame = tuple.__new__


def announcement(endpoint: str) -> bytes:
    """What a message of a publisher with replay on carries between header and body."""
    data = endpoint.encode()
    if not data or len(data) > MAX_ENDPOINT:
        raise ValueError(f"replay endpoint {endpoint!r} is not 1..{MAX_ENDPOINT} bytes")
    return _U16.pack(len(data)) + data


def pack_run(
    topic: bytes, publisher: int, first: int, count: int, body: bytes, announce: bytes = b""
) -> bytes:
    """A run-form message: ``body`` is one msgpack array of ``count`` items; ``announce``
    (from :func:`announcement`) sets ``REPLAY``."""
    flags = FLAG_RUN | FLAG_REPLAY if announce else FLAG_RUN
    header = _HEADER.pack(WIRE_VERSION, flags, 0, count, publisher, first)
    return b"".join((topic, header, announce, body))


def pack_table(
    topic: bytes, publisher: int, first: int, payloads: list[bytes], announce: bytes = b""
) -> bytes:
    """A table-form message: a u32 length per payload, then the payloads end to end."""
    count = len(payloads)
    header = _HEADER.pack(WIRE_VERSION, FLAG_REPLAY if announce else 0, 0, count, publisher, first)
    table = _LENGTHS[count].pack(*map(len, payloads))
    return b"".join((topic, header, announce, table, *payloads))


def array_header(count: int) -> bytes:
    """The msgpack array header for ``count`` (at most :data:`MAX_ITEMS`) elements."""
    return _ARRAY_HEADERS[count]


def unpack(frame: bytes) -> Frame:
    """Parse ``frame``'s header; :class:`MalformedFrame` says what is wrong with it."""
    size = len(frame)
    if size < HEADER_END:
        raise MalformedFrame(f"{size} bytes, shorter than the {HEADER_END}-byte header")
    version, flags, _reserved, count, publisher, first = _HEADER.unpack_from(
        frame, TOPIC_FRAME_SIZE
    )
    if version not in (1, WIRE_VERSION):
        raise MalformedFrame(f"wire format version {version}, expected 1 or {WIRE_VERSION}")
    if flags & ~_KNOWN_FLAGS or (version == 1 and flags):
        raise MalformedFrame(f"unknown flags {flags:#04x} for version {version}")
    if not 0 < count <= MAX_ITEMS:
        raise MalformedFrame(f"count {count} is not within 1..{MAX_ITEMS}")
    topic = frame[:TOPIC_FRAME_SIZE]
    start, replay = HEADER_END, b""
    if flags & FLAG_REPLAY:
        start, replay = _endpoint_of(frame, size)
    if flags & FLAG_RUN:
        return _frame(Frame, (topic, publisher, first, count, None, start, replay))
    offset = start + 4 * count
    if offset > size:
        raise MalformedFrame(f"{size} bytes, too short for {count} payload lengths")
    lengths = _LENGTHS[count].unpack_from(frame, start)
    if offset + sum(lengths) != size:
        raise MalformedFrame(f"payload lengths {list(lengths)} do not add up to {size} bytes")
    return _frame(Frame, (topic, publisher, first, count, lengths, offset, replay))


def _endpoint_of(frame: bytes, size: int) -> tuple[int, bytes]:
    """Where the body starts after the replay endpoint, and the endpoint."""
    if size < HEADER_END + 2:
        raise MalformedFrame(f"{size} bytes, too short for a replay endpoint")
    (length,) = _U16.unpack_from(frame, HEADER_END)
    start = HEADER_END + 2 + length
    if not 0 < length <= MAX_ENDPOINT or start > size:
        raise MalformedFrame(f"replay endpoint of {length} bytes in a {size}-byte message")
    return start, frame[HEADER_END + 2 : start]


# -- the replay protocol: requests to a publisher's replay endpoint and its replies ----------

REQUEST_SIZE = TOPIC_FRAME_SIZE + 24
"""A range request is one frame of exactly this many bytes; a since request starts with as
many."""
KIND_REQUEST = 1
KIND_ITEMS = 2
KIND_END = 3
KIND_ERROR = 4
KIND_SINCE = 5

# topic | version u8, kind u8, reserved u16, request id u32, first u64, end u64
_REQUEST = struct.Struct("<BBHIQQ")
# version u8, kind u8, reserved u16, request id u32
_REPLY = struct.Struct("<BBHI")
# after KIND_END: the sequence number after the last item sent, u8 1 when more is available
_END = struct.Struct("<QB")


class Request(NamedTuple):
    """``KIND_REQUEST``: the items of ``topic`` numbered ``first`` up to (not including)
    ``end``."""

    topic: bytes
    request_id: int
    first: int
    end: int


class Since(NamedTuple):
    """``KIND_SINCE``: every topic's messages in the order sent, after message ``cursor``
    (``0``: from the start), each topic from the message holding item ``starts[topic]`` on, or
    for a topic not in ``starts``, holding its newest ``history`` items (``0``: none)."""

    request_id: int
    history: int
    cursor: int
    starts: dict[bytes, int]


MAX_STARTS = 1024
"""Topics a :class:`Since` request may list."""
_START = struct.Struct(f"<{TOPIC_FRAME_SIZE}sQ")


def pack_since(request_id: int, history: int, cursor: int, starts: dict[bytes, int]) -> bytes:
    head = bytes(TOPIC_FRAME_SIZE) + _REQUEST.pack(
        WIRE_VERSION, KIND_SINCE, 0, request_id, history, cursor
    )
    return head + b"".join(_START.pack(topic, seq) for topic, seq in starts.items())


def unpack_request(data: bytes) -> Request | Since:
    """Parse a request; :class:`MalformedFrame` says what is wrong with it."""
    if len(data) < REQUEST_SIZE:
        raise MalformedFrame(f"a request of {len(data)} bytes, expected {REQUEST_SIZE} or more")
    version, kind, _reserved, request_id, first, end = _REQUEST.unpack_from(data, TOPIC_FRAME_SIZE)
    if version != WIRE_VERSION or kind not in (KIND_REQUEST, KIND_SINCE):
        raise MalformedFrame(f"a request of version {version} kind {kind}")
    if kind == KIND_REQUEST:
        if len(data) != REQUEST_SIZE:
            raise MalformedFrame(f"a request of {len(data)} bytes, expected {REQUEST_SIZE}")
        if end <= first:
            raise MalformedFrame(f"an empty range {first}..{end}")
        return Request(data[:TOPIC_FRAME_SIZE], request_id, first, end)
    count, rest = divmod(len(data) - REQUEST_SIZE, _START.size)
    if rest or count > MAX_STARTS:
        raise MalformedFrame(
            f"a since request of {len(data)} bytes: not {REQUEST_SIZE} + up to {MAX_STARTS} "
            f"x {_START.size}"
        )
    if not count and not first:
        raise MalformedFrame("a since request for nothing (no starts, a history of 0 items)")
    starts = dict(_START.iter_unpack(data[REQUEST_SIZE:]))
    return Since(request_id, first, end, starts)


def reply_header(kind: int, request_id: int) -> bytes:
    """The first frame of each reply: ``KIND_ITEMS`` (a message follows), ``KIND_END`` (see
    :func:`pack_end`) or ``KIND_ERROR`` (UTF-8 text follows)."""
    return _REPLY.pack(WIRE_VERSION, kind, 0, request_id)


def pack_end(after: int, more: bool) -> bytes:
    return _END.pack(after, int(more))


def unpack_reply(header: bytes) -> tuple[int, int]:
    """``(kind, request id)`` of a reply's first frame."""
    if len(header) != _REPLY.size:
        raise MalformedFrame(f"a reply header of {len(header)} bytes, expected {_REPLY.size}")
    version, kind, _reserved, request_id = _REPLY.unpack(header)
    if version != WIRE_VERSION or kind not in (KIND_ITEMS, KIND_END, KIND_ERROR):
        raise MalformedFrame(f"a reply of version {version} kind {kind}")
    return kind, request_id


def unpack_end(body: bytes) -> tuple[int, bool]:
    """``(after, more)`` of an end marker."""
    if len(body) != _END.size:
        raise MalformedFrame(f"an end marker of {len(body)} bytes, expected {_END.size}")
    after, more = _END.unpack(body)
    return after, bool(more)
