"""The file format of a store: the only module that knows where anything is.

A store is chunk files of :data:`CHUNK_SIZE` bytes of little-endian 8-byte words. A *store
offset* names a byte of the store (``chunk index * CHUNK_SIZE + offset in the chunk``; 0 means
"none"); a *word index* names a word of one chunk. This module turns one into the other, packs and
checks chunk headers, writes and reads key records, series summaries and segment tables, and
computes the check words that let a reader tell a finished structure from a half-visible one.
docs/kvstore.md draws the same layout.
"""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import mul
from typing import NamedTuple

from wirebus.errors import KVStoreError

MAGIC = int.from_bytes(b"WBKVSTOR", "little")
VERSION = 2  # 2: the histogram digest is a hash of the entries
CHUNK_SIZE = 1 << 20
CHUNK_NAME = "chunk-{:06d}"
LOCK_NAME = "lock"
MAX_KEY_BYTES = 255

COUNTER, GAUGE, SERIES = 1, 2, 3
KIND_NAMES = {COUNTER: "counter", GAUGE: "gauge", SERIES: "series"}

# Chunk header: words 0-7 of every chunk.
_HEADER = struct.Struct("<8q")
_HEADER_BYTES = 64
_MAGIC_WORD, _VERSION_WORD, _SIZE_WORD, _INDEX_WORD, _FIRST_KEY_WORD, _PID_WORD = range(6)

# Key record: commit, next, kind | name length << 8, data offset, then the name.
_COMMIT, _NEXT, _META, _DATA = range(4)
RECORD_HEAD = 32
_RECORD_BODY = struct.Struct("<qq")

# Series block: the summary words, then the value and histogram segment tables.
_COUNT, _NAN, _SUM, _MIN, _MAX, _ENTRIES, _CHECK = range(7)
_SUMMARY = struct.Struct("<7Q")
VALUE_SEGMENTS = 1024
HISTOGRAM_SEGMENTS = 128
_VALUE_TABLE = 8
_HISTOGRAM_TABLE = _VALUE_TABLE + VALUE_SEGMENTS
_SERIES_WORDS = _HISTOGRAM_TABLE + HISTOGRAM_SEGMENTS
VALUE_BYTES = 8  # one word per value
ENTRY_BYTES = 16  # a histogram entry: bucket key, count


def value_segment_capacity(k: int) -> int:
    """How many values segment ``k`` of a series holds."""
    return min(256 << k, 32768)


def histogram_segment_capacity(k: int) -> int:
    """How many histogram entries segment ``k`` of a series holds."""
    return min(64 << k, 4096)


VALUE_SEGMENT_START = list(
    accumulate((value_segment_capacity(k) for k in range(VALUE_SEGMENTS)), initial=0)
)
HISTOGRAM_SEGMENT_START = list(
    accumulate((histogram_segment_capacity(k) for k in range(HISTOGRAM_SEGMENTS)), initial=0)
)

# +0.0 and -0.0 are stored as two signalling-NaN patterns, so an all-zero word means "not written
# yet". Arithmetic never produces signalling NaNs; these two payloads are reserved.
ZERO_POS_BITS = 0x7FF3_FFFF_FFFF_FFFF
ZERO_NEG_BITS = 0xFFF3_FFFF_FFFF_FFFF - (1 << 64)

P = (1 << 61) - 1  # the check words' modulus
_MIX = (
    0x0B4C_F6E9_A2D1_3F57,
    0x1D8E_3A5C_71F0_2B93,
    0x06F1_D3B7_9C4A_58E1,
    0x13A7_5E09_C2B6_D84F,
    0x0C59_82F1_7D3E_A6B5,
    0x1E24_B9D7_4F61_0C3D,
)
_MIX_DIGEST = 0x17C3_A58E_2D9F_06B1


# -- offsets ----------------------------------------------------------------------------------


def store_offset(chunk: int, word: int) -> int:
    """The store offset of word ``word`` of chunk ``chunk``."""
    return chunk * CHUNK_SIZE + word * 8


def first_free_word() -> int:
    """The first word of a chunk that the allocator may hand out."""
    return _HEADER_BYTES // 8


def locate(offset: int, nbytes: int) -> tuple[int, int] | None:
    """``(chunk, word)`` of the ``nbytes`` at store ``offset``; ``None`` unless they lie inside
    one chunk's allocatable space, 8-byte aligned (no writer stores any other pointer)."""
    chunk, start = divmod(offset, CHUNK_SIZE)
    if offset <= 0 or offset % 8 or start < _HEADER_BYTES or start + nbytes > CHUNK_SIZE:
        return None
    return chunk, start >> 3


# -- chunk header -----------------------------------------------------------------------------


def pack_header(index: int, pid: int) -> bytes:
    """The header of a new chunk ``index`` made by writer ``pid``."""
    return _HEADER.pack(MAGIC, VERSION, CHUNK_SIZE, index, 0, pid, 0, 0)


HEADER_BYTES = _HEADER.size


def check_header(header: bytes, index: int, name: str, size: int) -> None:
    """Raise ``KVStoreError`` unless ``header`` (of file ``name``, ``size`` bytes) starts chunk
    ``index`` of a store this code reads."""
    if len(header) < _HEADER.size:
        raise KVStoreError(f"{name!r} is truncated: {size} bytes")
    words = _HEADER.unpack(header)
    if words[_MAGIC_WORD] != MAGIC:
        raise KVStoreError(f"{name!r} is not a wirebus store (magic {header[:8]!r})")
    if words[_VERSION_WORD] != VERSION:
        raise KVStoreError(
            f"{name!r} has format version {words[_VERSION_WORD]}; this reader reads "
            f"version {VERSION}"
        )
    if words[_SIZE_WORD] != CHUNK_SIZE:
        raise KVStoreError(
            f"{name!r} has a corrupt header: chunk size {words[_SIZE_WORD]} "
            f"(format version {VERSION} has {CHUNK_SIZE})"
        )
    if words[_INDEX_WORD] != index:
        raise KVStoreError(f"{name!r} has a corrupt header: index {words[_INDEX_WORD]}")
    if size != CHUNK_SIZE:
        raise KVStoreError(f"{name!r} is truncated: {size} of {CHUNK_SIZE} bytes")


def is_store_start(magic: bytes) -> bool:
    """Whether the first 8 bytes of a file are a store's magic number."""
    return magic == MAGIC.to_bytes(8, "little")


def header_pid(header: bytes) -> int | None:
    """The writer pid in a chunk header; ``None`` if it is too short to hold one."""
    if len(header) < _HEADER.size:
        return None
    pid: int = _HEADER.unpack(header)[_PID_WORD]
    return pid


def first_key(chunk0: memoryview[int]) -> int:
    """The store offset of the first key record (0: none yet), from chunk 0's words."""
    return chunk0[_FIRST_KEY_WORD]


def set_first_key(chunk0: memoryview[int], offset: int) -> None:
    chunk0[_FIRST_KEY_WORD] = offset


# -- key records ------------------------------------------------------------------------------


def record_bytes(name: bytes) -> int:
    """The size of the key record of ``name``."""
    return RECORD_HEAD + ((len(name) + 7) & ~7)


def data_bytes(kind: int) -> int:
    """The size of a key's data: one word, or a series block."""
    return _SERIES_WORDS * 8 if kind == SERIES else 8


def _record_check(body: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little") >> 1 | 1


def write_record(
    words: memoryview[int], raw: memoryview, word: int, kind: int, name: bytes, data: int
) -> None:
    """Write the key record at ``word``: its body first, then the commit word."""
    padded = (len(name) + 7) & ~7
    body = _RECORD_BODY.pack(kind | len(name) << 8, data) + name.ljust(padded, b"\0")
    start = (word + _META) * 8
    raw[start : start + len(body)] = body
    words[word + _COMMIT] = _record_check(body)


def link_record(words: memoryview[int], word: int, next_offset: int) -> None:
    """Point the record at ``word`` to the record at store offset ``next_offset``."""
    words[word + _NEXT] = next_offset


def next_record(words: memoryview[int], word: int) -> int:
    """The store offset of the record after the one at ``word`` (0: none yet)."""
    return words[word + _NEXT]


class Record(NamedTuple):
    kind: int
    name: bytes
    data: int  # store offset of the key's data


def read_record(words: memoryview[int], raw: memoryview, word: int) -> Record | None:
    """The record at ``word``; ``None`` while its body or commit word is not (all) visible."""
    meta = words[word + _META]
    kind, size = meta & 0xFF, meta >> 8
    start = word * 8
    end = start + RECORD_HEAD + ((size + 7) & ~7)
    if kind not in KIND_NAMES or not 0 < size <= MAX_KEY_BYTES or end > CHUNK_SIZE:
        return None
    body = bytes(raw[start:end])
    if int.from_bytes(body[:8], "little") != _record_check(body[_META * 8 :]):
        return None
    data = int.from_bytes(body[_DATA * 8 : _DATA * 8 + 8], "little", signed=True)
    return Record(kind, body[RECORD_HEAD : RECORD_HEAD + size], data)


# -- series blocks ----------------------------------------------------------------------------


def histogram_digest(entries: Iterable[bytes]) -> int:
    """The digest of a series' histogram in the check word: blake2b-64 of its entries' bytes
    (key and count words, in entry order), fed in the given pieces."""
    digest = hashlib.blake2b(digest_size=8)
    for piece in entries:
        digest.update(piece)
    return int.from_bytes(digest.digest(), "little")


def _summary_check(words: Sequence[int], digest: int) -> int:
    mixed: int = sum(map(mul, words, _MIX))
    return (mixed + digest * _MIX_DIGEST) % P


_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")


def _bits(x: float) -> int:
    bits: int = _U64.unpack(_F64.pack(x))[0]
    return bits


class Summary(NamedTuple):
    """A published series summary as stored: floats as floats, the rest as ints."""

    n: int
    nan: int
    sum: float
    min: float
    max: float
    entries: int
    check: int


def write_summary(
    words: memoryview[int], floats: memoryview[float], block: int, summary: Summary, digest: int
) -> None:
    """Publish ``summary`` (its ``check`` ignored) in the block at ``block``: the fields, then
    the check word over them and the histogram ``digest``."""
    words[block + _COUNT] = summary.n
    words[block + _NAN] = summary.nan
    floats[block + _SUM] = summary.sum
    floats[block + _MIN] = summary.min
    floats[block + _MAX] = summary.max
    words[block + _ENTRIES] = summary.entries
    fields = (
        summary.n,
        summary.nan,
        _bits(summary.sum),
        _bits(summary.min),
        _bits(summary.max),
        summary.entries,
    )
    words[block + _CHECK] = _summary_check(fields, digest)


def summary_bytes(raw: memoryview, block: int) -> bytes:
    """A copy of the summary words of the block at ``block``."""
    return bytes(raw[block * 8 : block * 8 + _SUMMARY.size])


def unpack_summary(copied: bytes) -> Summary:
    n, nan, sum_bits, min_bits, max_bits, entries, check = _SUMMARY.unpack(copied)
    sum_, min_, max_ = array("d", array("Q", [sum_bits, min_bits, max_bits]).tobytes())
    return Summary(n, nan, sum_, min_, max_, entries, check)


def summary_is_valid(copied: bytes, digest: int) -> bool:
    """Whether the copied summary words and the histogram ``digest`` match its check word."""
    words = _SUMMARY.unpack(copied)
    check: int = words[6]
    return _summary_check(words[:6], digest) == check


def published_count(words: memoryview[int], block: int) -> int:
    """The count word of a series block (a hint: it is not validated)."""
    return words[block + _COUNT]


def value_segment(words: memoryview[int], block: int, k: int) -> int:
    """The store offset of value segment ``k`` (0: not allocated yet)."""
    return words[block + _VALUE_TABLE + k]


def set_value_segment(words: memoryview[int], block: int, k: int, offset: int) -> None:
    words[block + _VALUE_TABLE + k] = offset


def histogram_segment(words: memoryview[int], block: int, k: int) -> int:
    """The store offset of histogram segment ``k`` (0: not allocated yet)."""
    return words[block + _HISTOGRAM_TABLE + k]


def set_histogram_segment(words: memoryview[int], block: int, k: int, offset: int) -> None:
    words[block + _HISTOGRAM_TABLE + k] = offset


def decode_values(words: list[int]) -> list[float]:
    """The floats stored as value ``words`` (the two zero patterns back to ±0.0)."""
    floats: list[float] = array("d", array("q", words).tobytes()).tolist()
    if ZERO_POS_BITS in words or ZERO_NEG_BITS in words:
        zeros = {ZERO_POS_BITS: 0.0, ZERO_NEG_BITS: -0.0}
        floats = [zeros.get(word, value) for word, value in zip(words, floats, strict=True)]
    return floats
