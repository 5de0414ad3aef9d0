"""The wire format: the only code that knows a wirebus message's bytes (docs/wire-format.md).

Every message is one ZMQ frame: the 32-byte topic, a 24-byte header, then the items' payloads
in one of two forms. The *table* form (flags 0) has one u32 length per item and the payloads
laid end to end; the *run* form (flag ``RUN``) is one msgpack array holding the items, what a
run-encoding codec produces in one call.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from wirebus.codec import TOPIC_FRAME_SIZE

WIRE_VERSION = 2
"""Version byte written by this release; version 1 (the table form only) is still read."""

FLAG_RUN = 0x01
"""Flags bit 0: the body is one msgpack array of ``count`` items, with no length table."""

MAX_ITEMS = 128
"""The most items one message carries (a reader refuses more)."""

# topic | version u8, flags u8, reserved u16, count u32, publisher id u64, first seq u64 | body
_HEADER = struct.Struct("<BBHIQQ")
HEADER_END = TOPIC_FRAME_SIZE + _HEADER.size
PUBLISHER_ID = slice(TOPIC_FRAME_SIZE + 8, TOPIC_FRAME_SIZE + 16)
"""Where the publisher id sits in a frame (a conflating reader keys frames by it)."""

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


def pack_run(topic: bytes, publisher: int, first: int, count: int, body: bytes) -> bytes:
    """A run-form message: ``body`` is one msgpack array of ``count`` items."""
    header = _HEADER.pack(WIRE_VERSION, FLAG_RUN, 0, count, publisher, first)
    return b"".join((topic, header, body))


def pack_table(topic: bytes, publisher: int, first: int, payloads: list[bytes]) -> bytes:
    """A table-form message: a u32 length per payload, then the payloads end to end."""
    count = len(payloads)
    header = _HEADER.pack(WIRE_VERSION, 0, 0, count, publisher, first)
    table = _LENGTHS[count].pack(*map(len, payloads))
    return b"".join((topic, header, table, *payloads))


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
    if flags & ~FLAG_RUN or (version == 1 and flags):
        raise MalformedFrame(f"unknown flags {flags:#04x} for version {version}")
    if not 0 < count <= MAX_ITEMS:
        raise MalformedFrame(f"count {count} is not within 1..{MAX_ITEMS}")
    topic = frame[:TOPIC_FRAME_SIZE]
    if flags & FLAG_RUN:
        return Frame(topic, publisher, first, count, None, HEADER_END)
    offset = HEADER_END + 4 * count
    if offset > size:
        raise MalformedFrame(f"{size} bytes, too short for {count} payload lengths")
    lengths = _LENGTHS[count].unpack_from(frame, HEADER_END)
    if offset + sum(lengths) != size:
        raise MalformedFrame(f"payload lengths {list(lengths)} do not add up to {size} bytes")
    return Frame(topic, publisher, first, count, lengths, offset)
