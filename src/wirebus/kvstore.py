"""A lock-free shared-memory metrics store: one writer process, any number of reader processes.

:class:`BasicKVStore` (the writer) keeps counters, gauges and series of float64 in fixed-size
chunk files in a private directory (under ``/dev/shm`` by default). :class:`KVStoreReader` maps
the same files read-only in any process and never blocks the writer. Every value a reader returns
is one the writer stored, on x86 and on ARM: single values are aligned 8-byte words written with
one store, and everything that spans several words (key records, series summaries and
histograms) carries a check word that readers verify, retrying when a store is not yet visible.
The file layout and the protocol are described in ``docs/kvstore.md``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import math
import mmap
import numbers
import os
import re
import stat
import struct
import tempfile
import weakref
from abc import ABC, abstractmethod
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, islice
from operator import mul
from types import TracebackType
from typing import NamedTuple, cast

import msgspec

from wirebus import _paths
from wirebus._resource import Resource
from wirebus.errors import KVStoreError

__all__ = [
    "BasicKVStore",
    "Counter",
    "Gauge",
    "KVStore",
    "KVStoreReader",
    "Series",
    "SeriesSummary",
    "SeriesView",
    "cleanup_stale",
    "remove_store",
]

_MAGIC = int.from_bytes(b"WBKVSTOR", "little")
_VERSION = 1
_CHUNK_SIZE = 1 << 20
_CHUNK_HEADER = 64
_CHUNK_NAME = "chunk-{:06d}"
_LOCK_NAME = "lock"
_MAX_KEY_BYTES = 255
_PUBLISH_EVERY = 8192
_READ_ATTEMPTS = 64

_H_MAGIC, _H_VERSION, _H_CHUNK_SIZE, _H_INDEX, _H_FIRST_KEY, _H_PID = range(6)
_HEADER = struct.Struct("<8q")

_COUNTER, _GAUGE, _SERIES = 1, 2, 3
_KIND_NAMES = {_COUNTER: "counter", _GAUGE: "gauge", _SERIES: "series"}

_R_COMMIT, _R_NEXT, _R_META, _R_DATA = range(4)
_RECORD_HEAD = 32
_RECORD_BODY = struct.Struct("<qq")

_S_COUNT, _S_NAN, _S_SUM, _S_MIN, _S_MAX, _S_ENTRIES, _S_CHECK = range(7)
_SUMMARY = struct.Struct("<7Q")
_S_VSEGS = 8
_VSEG_SLOTS = 1024
_S_BSEGS = _S_VSEGS + _VSEG_SLOTS
_BSEG_SLOTS = 128
_S_WORDS = _S_BSEGS + _BSEG_SLOTS


def _vseg_capacity(k: int) -> int:
    return min(256 << k, 32768)


def _bseg_capacity(k: int) -> int:
    return min(64 << k, 4096)


_VSEG_START = list(accumulate((_vseg_capacity(k) for k in range(_VSEG_SLOTS)), initial=0))
_BSEG_START = list(accumulate((_bseg_capacity(k) for k in range(_BSEG_SLOTS)), initial=0))

_F64 = struct.Struct("<d")
_U64 = struct.Struct("<Q")
_M64 = (1 << 64) - 1

# +0.0 and -0.0 are stored as two signalling-NaN patterns, so an all-zero word means "not written
# yet". Arithmetic never produces signalling NaNs; these two payloads are reserved.
_ZERO_POS_BITS = 0x7FF3_FFFF_FFFF_FFFF
_ZERO_NEG_BITS = 0xFFF3_FFFF_FFFF_FFFF - (1 << 64)

_KEY_SHIFT = 46
_M18 = (1 << 18) - 1
_KEY_SIGN = 1 << 17
_KEY_MAGNITUDE = _KEY_SIGN - 1
_INF_MAGNITUDE = 0x7FF0_0000_0000_0000 >> _KEY_SHIFT
_ZERO_POS_KEY = 0x7FF3_FFFF_FFFF_FFFF >> _KEY_SHIFT
_ZERO_NEG_KEY = 0xFFF3_FFFF_FFFF_FFFF >> _KEY_SHIFT
_LANES = int.from_bytes(b"\xff\xff\x03\x00\x00\x00\x00\x00" * _PUBLISH_EVERY, "little")

_P = (1 << 61) - 1
_MIX = (
    0x0B4C_F6E9_A2D1_3F57,
    0x1D8E_3A5C_71F0_2B93,
    0x06F1_D3B7_9C4A_58E1,
    0x13A7_5E09_C2B6_D84F,
    0x0C59_82F1_7D3E_A6B5,
    0x1E24_B9D7_4F61_0C3D,
)
_MIX_DIGEST = 0x17C3_A58E_2D9F_06B1

_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_:]")
_STORE_FILE = re.compile(rf"\.?chunk-\d{{6}}(\.tmp)?|{_LOCK_NAME}")


def _bits(x: float) -> int:
    bits: int = _U64.unpack(_F64.pack(x))[0]
    return bits


def _from_bits(bits: int) -> float:
    value: float = _F64.unpack(_U64.pack(bits))[0]
    return value


@functools.cache
def _weight(key: int) -> int:
    z = (key + 0x9E37_79B9_7F4A_7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _M64
    return (z ^ (z >> 31)) % _P


def _summary_check(words: Sequence[int], digest: int) -> int:
    mixed: int = sum(map(mul, words, _MIX))
    return (mixed + digest * _MIX_DIGEST) % _P


def _record_check(body: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(body, digest_size=8).digest(), "little") >> 1 | 1


def _is_nan_key(key: int) -> bool:
    return (key & _KEY_MAGNITUDE) > _INF_MAGNITUDE and key not in (_ZERO_POS_KEY, _ZERO_NEG_KEY)


@functools.cache
def _representative(key: int) -> float:
    """The value reported for a histogram bucket: within 0.78% of every normal value in it."""
    if key == _ZERO_POS_KEY:
        return 0.0
    if key == _ZERO_NEG_KEY:
        return -0.0
    magnitude = key & _KEY_MAGNITUDE
    exponent, step = magnitude >> 6, magnitude & 63
    if magnitude == _INF_MAGNITUDE:
        value = math.inf
    elif exponent:
        value = math.ldexp(1.0 + (step + 0.5) / 64, exponent - 1023)
    else:
        value = math.ldexp((step + 0.5) / 64, -1022)
    return -value if key & _KEY_SIGN else value


def _sort_key(key: int) -> int:
    """A distinct integer per bucket key, ordered like the buckets' values."""
    if key == _ZERO_NEG_KEY:
        return 0
    if key == _ZERO_POS_KEY:
        return 1
    magnitude = key & _KEY_MAGNITUDE
    return -1 - magnitude if key & _KEY_SIGN else 2 + magnitude


def _bucket_counts(raw: bytes) -> dict[int, int]:
    """How many of the stored words in ``raw`` fall in each histogram bucket."""
    if len(raw) > 512:
        lanes = (int.from_bytes(raw, "little") >> _KEY_SHIFT) & _LANES
        return collections.Counter(memoryview(lanes.to_bytes(len(raw), "little")).cast("q"))
    counts: dict[int, int] = {}
    for word in memoryview(raw).cast("Q").tolist():
        key = word >> _KEY_SHIFT
        counts[key] = counts.get(key, 0) + 1
    return counts


class _Batch(NamedTuple):
    nan: int
    sum: float
    min: float
    max: float
    counts: dict[int, int]


def _fold(raw: bytes) -> _Batch:
    """Summarise at most ``_PUBLISH_EVERY`` stored words: NaN count, sum, min, max, buckets."""
    counts = _bucket_counts(raw)
    floats = cast("list[float]", memoryview(raw).cast("d").tolist())
    total = sum(floats)
    if total == total:
        return _Batch(0, total, min(floats), max(floats), counts)
    clean = [x for x in floats if x == x]
    zeros = counts.get(_ZERO_POS_KEY, 0) + counts.get(_ZERO_NEG_KEY, 0)
    nan = len(floats) - len(clean) - zeros
    for key in [key for key in counts if _is_nan_key(key)]:
        del counts[key]
    if _ZERO_POS_KEY in counts:
        clean.append(0.0)
    if _ZERO_NEG_KEY in counts:
        clean.append(-0.0)
    if not clean:
        return _Batch(nan, 0.0, math.inf, -math.inf, counts)
    return _Batch(nan, sum(clean), min(clean), max(clean), counts)


def _decode(words: list[int]) -> list[float]:
    floats = array("d", array("q", words).tobytes()).tolist()
    if _ZERO_POS_BITS in words or _ZERO_NEG_BITS in words:
        zeros = {_ZERO_POS_BITS: 0.0, _ZERO_NEG_BITS: -0.0}
        floats = [zeros.get(word, value) for word, value in zip(words, floats, strict=True)]
    return floats


def _encode_name(name: object) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"key name must be a str, got {type(name).__name__}: {name!r}")
    if not name:
        raise ValueError("key name must not be empty")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"key name {name!r} is not valid UTF-8 (lone surrogate)") from None
    if len(raw) > _MAX_KEY_BYTES:
        raise ValueError(
            f"key name {name!r} is {len(raw)} bytes in UTF-8, longer than {_MAX_KEY_BYTES}"
        )
    return raw


def _check_mode(mode: object) -> int:
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"mode must be an int, got {type(mode).__name__}: {mode!r}")
    if mode & ~0o777 or mode & 0o600 != 0o600 or mode & 0o022:
        raise ValueError(
            f"mode {mode:#o} is not allowed: files must be readable and writable by their owner "
            "and writable by no one else"
        )
    return mode


def _dir_mode(mode: int) -> int:
    return 0o700 | (0o050 if mode & 0o040 else 0) | (0o005 if mode & 0o004 else 0)


def _remove(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _check_trusted(path: str, info: os.stat_result, owner: int) -> None:
    """Refuse ``path`` unless ``owner`` owns it and nobody else may write to it."""
    if info.st_uid != owner:
        raise KVStoreError(
            f"{path!r} is owned by uid {info.st_uid}, not {owner}: refusing to trust it"
        )
    if info.st_mode & 0o022:
        raise KVStoreError(
            f"{path!r} has mode {stat.S_IMODE(info.st_mode):#o}: writable by group or others, "
            "refusing to trust it"
        )


def _open_dir(path: str, owner: int) -> int:
    """Open the store directory ``path`` (never through a symlink) once it is trusted."""
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise KVStoreError(f"{path!r} is not a store directory: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise KVStoreError(f"{path!r} is a symlink: a store path is never followed")
    if not stat.S_ISDIR(info.st_mode):
        raise KVStoreError(f"{path!r} is not a store directory (it is not a directory)")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise KVStoreError(f"cannot open store directory {path!r}: {exc}") from exc
    try:
        _check_trusted(path, os.fstat(fd), owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_file(dir_fd: int, dir_path: str, name: str, flags: int, owner: int) -> int:
    """Open the store file ``name``: never through a symlink, never blocking on a FIFO, and only
    a regular file this ``owner`` owns and nobody else may write. ``FileNotFoundError`` passes."""
    path = os.path.join(dir_path, name)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KVStoreError(f"{path!r} is a symlink: store files are never followed") from None
        raise KVStoreError(f"cannot open {path!r}: {exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KVStoreError(f"{path!r} is not a regular file (mode {info.st_mode:#o})")
        _check_trusted(path, info, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _reserve(fd: int, size: int) -> None:
    """Back every page of the file now, so a full file system fails here and not with SIGBUS."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        fallocate(fd, 0, size)
        return
    block = bytes(1 << 16)
    for offset in range(0, size, len(block)):
        os.pwrite(fd, block[: size - offset], offset)


class _Mapping:
    """One mapped chunk file with the views used to read and write its words."""

    __slots__ = ("d", "mm", "q", "raw")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.raw = memoryview(mm)
        self.d = self.raw.cast("d")
        self.q = self.raw.cast("q")

    def release(self) -> None:
        self.d.release()
        self.q.release()
        self.raw.release()
        self.mm.close()


class Counter(ABC):
    """A monotonically increasing float64 value: a count, a total of bytes or seconds."""

    __slots__ = ()

    @abstractmethod
    def inc(self, n: float = 1.0) -> None:
        """Add ``n`` (a non-negative real number, ``inf`` allowed) to the counter."""

    @abstractmethod
    def set(self, value: float) -> None:
        """Replace the value, e.g. to restore a total; NaN and ±inf are stored as they are."""

    @property
    @abstractmethod
    def value(self) -> float:
        """The current value."""


class Gauge(ABC):
    """A float64 value that goes up and down: a queue depth, a rate, a temperature."""

    __slots__ = ()

    @abstractmethod
    def set(self, value: float) -> None:
        """Replace the value; NaN and ±inf are stored as they are."""

    @property
    @abstractmethod
    def value(self) -> float:
        """The current value."""


class Series(ABC):
    """An append-only sequence of float64 observations (latencies, sizes) with percentiles."""

    __slots__ = ()

    @abstractmethod
    def append(self, value: float) -> None:
        """Append one observation; NaN and ±inf are stored as they are."""

    @abstractmethod
    def extend(self, values: Iterable[float]) -> None:
        """Append every observation of ``values``, in order."""

    @abstractmethod
    def __len__(self) -> int:
        """The number of observations appended so far."""


class KVStore(Resource):
    """The interface a metrics backend implements: named counters, gauges and series.

    Asking twice for the same name returns the same handle; asking for an existing name as
    another kind raises ``TypeError``. A store is a context manager that closes on exit.
    """

    @abstractmethod
    def counter(self, name: str) -> Counter:
        """Return the counter ``name``, creating it (at 0.0) on first use."""

    @abstractmethod
    def gauge(self, name: str) -> Gauge:
        """Return the gauge ``name``, creating it (at 0.0) on first use."""

    @abstractmethod
    def series(self, name: str) -> Series:
        """Return the series ``name``, creating it (empty) on first use."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; handles used afterwards raise ``RuntimeError``. Idempotent."""


class _ShmCounter(Counter):
    __slots__ = ("_index", "_name", "_store", "_view")

    def __init__(self, store: BasicKVStore, name: str, view: memoryview[float], index: int):
        self._store = store
        self._name = name
        self._view = view
        self._index = index

    def inc(self, n: float = 1.0) -> None:
        try:
            if n >= 0.0:
                self._view[self._index] += n
                return
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._store._bad_value("counter", self._name, n, exc) from None
        raise ValueError(f"counter {self._name!r}: increment {n!r} is negative or NaN")

    def set(self, value: float) -> None:
        try:
            self._view[self._index] = value
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._store._bad_value("counter", self._name, value, exc) from None

    @property
    def value(self) -> float:
        try:
            return self._view[self._index]
        except ValueError:
            raise self._store._closed_error("counter", self._name) from None

    def __repr__(self) -> str:
        return f"<counter {self._name!r} of {self._store!r}>"


class _ShmGauge(Gauge):
    __slots__ = ("_index", "_name", "_store", "_view")

    def __init__(self, store: BasicKVStore, name: str, view: memoryview[float], index: int):
        self._store = store
        self._name = name
        self._view = view
        self._index = index

    def set(self, value: float) -> None:
        try:
            self._view[self._index] = value
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._store._bad_value("gauge", self._name, value, exc) from None

    @property
    def value(self) -> float:
        try:
            return self._view[self._index]
        except ValueError:
            raise self._store._closed_error("gauge", self._name) from None

    def __repr__(self) -> str:
        return f"<gauge {self._name!r} of {self._store!r}>"


class _ShmSeries(Series):
    """The writer's side of a series.

    Values go to the current segment with one store each. Every ``_PUBLISH_EVERY`` values, and
    whenever a segment fills, the batch is folded into the shared summary and histogram, which
    are then committed with a check word (see docs/kvstore.md).
    """

    __slots__ = (
        "_before",
        "_block",
        "_bsegs",
        "_bv",
        "_digest",
        "_entries",
        "_hi",
        "_ints",
        "_lo",
        "_mark",
        "_name",
        "_nan",
        "_pos",
        "_pub",
        "_raw",
        "_seg_end",
        "_seg_start",
        "_segment",
        "_slots",
        "_store",
        "_sum",
        "_vals",
    )

    def __init__(self, store: BasicKVStore, name: str, block: _Mapping, index: int) -> None:
        self._store = store
        self._name = name
        self._bv = block
        self._block = index
        self._vals = block.d
        self._ints = block.q
        self._raw = block.raw
        self._segment = -1
        self._before = 0
        self._pos = self._mark = self._pub = self._seg_start = self._seg_end = 0
        self._nan = 0
        self._sum = 0.0
        self._lo = math.inf
        self._hi = -math.inf
        self._digest = 0
        self._entries = 0
        self._bsegs: list[tuple[memoryview[int], int]] = []
        self._slots: dict[int, tuple[memoryview[int], int, int]] = {}

    def append(self, value: float) -> None:
        pos = self._pos
        if pos == self._mark:
            pos = self._make_room()
        try:
            if value:
                self._vals[pos] = value
            else:
                self._ints[pos] = (
                    _ZERO_POS_BITS if math.copysign(1.0, value) > 0 else _ZERO_NEG_BITS
                )
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._store._bad_value("series", self._name, value, exc) from None
        self._pos = pos + 1

    def extend(self, values: Iterable[float]) -> None:
        append = self.append
        for value in values:
            append(value)

    def __len__(self) -> int:
        return self._before + self._pos - self._seg_start

    def __repr__(self) -> str:
        return f"<series {self._name!r} ({len(self)} values) of {self._store!r}>"

    def _make_room(self) -> int:
        self._store._check_open()
        self._publish()
        if self._pos == self._seg_end:
            self._next_segment()
        self._mark = min(self._pos + _PUBLISH_EVERY, self._seg_end)
        return self._pos

    def _next_segment(self) -> None:
        k = self._segment + 1
        if k == _VSEG_SLOTS:
            raise KVStoreError(f"series {self._name!r} is full: it holds {len(self)} values")
        capacity = _vseg_capacity(k)
        mapping, index, offset = self._store._allocate(capacity * 8)
        self._bv.q[self._block + _S_VSEGS + k] = offset
        if k:
            self._before += _vseg_capacity(k - 1)
        self._segment = k
        self._vals, self._ints, self._raw = mapping.d, mapping.q, mapping.raw
        self._seg_start = self._pos = self._pub = index
        self._seg_end = index + capacity

    def _reserve_entries(self, more: int) -> None:
        while _BSEG_START[len(self._bsegs)] < self._entries + more:
            k = len(self._bsegs)
            mapping, index, offset = self._store._allocate(_bseg_capacity(k) * 16)
            self._bv.q[self._block + _S_BSEGS + k] = offset
            self._bsegs.append((mapping.q, index))

    def _new_entry(self, key: int) -> tuple[memoryview[int], int, int]:
        j = self._entries
        k = bisect_right(_BSEG_START, j) - 1
        view, index = self._bsegs[k]
        word = index + 2 * (j - _BSEG_START[k])
        view[word] = key
        self._entries = j + 1
        return view, word + 1, _weight(key)

    def _publish(self) -> None:
        start, end = self._pub, self._pos
        if start == end:
            return
        batch = _fold(bytes(self._raw[start * 8 : end * 8]))
        slots = self._slots
        new_keys = [key for key in batch.counts if key not in slots]
        self._reserve_entries(len(new_keys))
        for key in new_keys:
            slots[key] = self._new_entry(key)
        digest = self._digest
        for key, count in batch.counts.items():
            view, word, weight = slots[key]
            view[word] += count
            digest += count * weight
        self._digest = digest % _P
        self._nan += batch.nan
        self._sum += batch.sum
        self._lo = min(self._lo, batch.min)
        self._hi = max(self._hi, batch.max)
        count = self._before + end - self._seg_start
        q, d, b = self._bv.q, self._bv.d, self._block
        q[b + _S_COUNT] = count
        q[b + _S_NAN] = self._nan
        d[b + _S_SUM] = self._sum
        d[b + _S_MIN] = self._lo
        d[b + _S_MAX] = self._hi
        q[b + _S_ENTRIES] = self._entries
        words = (count, self._nan, _bits(self._sum), _bits(self._lo), _bits(self._hi))
        q[b + _S_CHECK] = _summary_check((*words, self._entries), self._digest)
        self._pub = end


_Handle = _ShmCounter | _ShmGauge | _ShmSeries


class BasicKVStore(KVStore):
    """The single writer of a store: a directory of fixed-size chunk files mapped into memory.

    ``path`` is the store directory; ``None`` makes a fresh private one under ``/dev/shm`` (the
    platform's temp dir where that does not exist). An existing directory must be empty. The
    directory is ``0o700`` and files get ``mode`` (owner read-write; group/other may read). A
    second writer on the same path gets :class:`KVStoreError`: the writer holds an exclusive
    ``flock`` on the store's lock file for its lifetime. If the constructor fails it removes
    everything it made.

    Handles are not thread-safe: use a store from one thread. ``close()`` keeps the files for
    readers; ``unlink()`` removes them. As a context manager the store closes on exit and unlinks
    too when it created the directory itself.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, mode: int = 0o600) -> None:
        self._mode = _check_mode(mode)
        self._closed = True
        self._unlinked = False
        self._created_dir = False
        self._dir_fd = -1
        self._lock_fd = -1
        self._maps: list[_Mapping] = []
        self._made: list[str] = []
        self._handles: dict[str, tuple[int, _Handle]] = {}
        self._series: list[_ShmSeries] = []
        self._last_record = 0
        self._top = _CHUNK_SIZE
        self.path = _paths.shm_dir() if path is None else os.fspath(path)
        try:
            self._make_dir(path is None)
            self._take_lock()
            self._add_chunk()
        except BaseException:
            self._abandon()
            raise
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self._lock_fd, self._dir_fd)

    def counter(self, name: str) -> Counter:
        return cast(Counter, self._key(name, _COUNTER))

    def gauge(self, name: str) -> Gauge:
        return cast(Gauge, self._key(name, _GAUGE))

    def series(self, name: str) -> Series:
        return cast(Series, self._key(name, _SERIES))

    def close(self) -> None:
        """Publish pending series values and release the mappings and the writer lock.

        The files stay for readers (and :func:`cleanup_stale` now counts the store as stale).
        """
        if self._closed:
            return
        self._closed = True
        for series in self._series:
            with contextlib.suppress(KVStoreError):  # an unpublished tail stays readable
                series._publish()
        self._release()

    def unlink(self) -> None:
        """Close the store and remove every file and directory it made. Idempotent."""
        self.close()
        if self._unlinked:
            return
        self._unlinked = True
        self._remove_made()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._created_dir:
            self.unlink()
        else:
            self.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._handles)} keys"
        return f"<BasicKVStore {self.path!r} ({state})>"

    def _make_dir(self, fresh: bool) -> None:
        """Make the store directory, or take an existing one this user owns and only this user
        may write; never through a symlink."""
        try:
            if fresh:
                self.path = tempfile.mkdtemp(prefix="wirebus-kv-", dir=self.path)
                self._created_dir = True
            else:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path, 0o700)
                    self._created_dir = True
        except OSError as exc:
            raise KVStoreError(f"cannot create store directory {self.path!r}: {exc}") from exc
        self._dir_fd = _open_dir(self.path, os.geteuid())
        if self._created_dir:
            os.fchmod(self._dir_fd, _dir_mode(self._mode))

    def _take_lock(self) -> None:
        lock = os.path.join(self.path, _LOCK_NAME)
        try:
            try:
                self._lock_fd = os.open(
                    _LOCK_NAME,
                    os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    self._mode,
                    dir_fd=self._dir_fd,
                )
                made = True
            except FileExistsError:
                self._lock_fd = _open_file(
                    self._dir_fd, self.path, _LOCK_NAME, os.O_RDWR, os.geteuid()
                )
                made = False
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KVStoreError(
                f"store {self.path!r} already has a writer{_writer_pid(self._dir_fd, self.path)}"
            ) from None
        except OSError as exc:
            raise KVStoreError(f"cannot lock {lock!r}: {exc}") from exc
        if made:
            self._made.append(_LOCK_NAME)
            os.fchmod(self._lock_fd, self._mode)
        others = sorted(set(os.listdir(self._dir_fd)) - {_LOCK_NAME})
        if _CHUNK_NAME.format(0) in others:
            raise KVStoreError(
                f"{self.path!r} holds a store whose writer is gone; remove it with "
                "remove_store() or choose another path"
            )
        if others:
            raise KVStoreError(f"{self.path!r} is not empty: it holds {others[:3]!r}")
        if not made:
            self._made.append(_LOCK_NAME)

    def _add_chunk(self) -> None:
        index = len(self._maps)
        final = _CHUNK_NAME.format(index)
        temp = f".{final}.tmp"
        try:
            fd = os.open(
                temp,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                self._mode,
                dir_fd=self._dir_fd,
            )
        except OSError as exc:
            raise KVStoreError(
                f"cannot create chunk file {os.path.join(self.path, temp)!r}: {exc}"
            ) from exc
        mm: mmap.mmap | None = None
        done = False
        try:
            os.fchmod(fd, self._mode)
            _reserve(fd, _CHUNK_SIZE)
            header = _HEADER.pack(_MAGIC, _VERSION, _CHUNK_SIZE, index, 0, os.getpid(), 0, 0)
            os.pwrite(fd, header, 0)
            mm = mmap.mmap(fd, _CHUNK_SIZE)
            os.rename(temp, final, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            done = True
        except OSError as exc:
            raise KVStoreError(
                f"cannot add chunk {os.path.join(self.path, final)!r} ({_CHUNK_SIZE} bytes) "
                f"to the store: {exc}"
            ) from exc
        finally:
            os.close(fd)
            if not done:
                if mm is not None:
                    mm.close()
                _remove(temp, self._dir_fd)
        assert mm is not None
        self._made.append(final)
        self._maps.append(_Mapping(mm))
        self._top = _CHUNK_HEADER

    def _allocate(self, nbytes: int) -> tuple[_Mapping, int, int]:
        """``nbytes`` fresh (zeroed) bytes: their mapping, word index and store offset."""
        if self._top + nbytes > _CHUNK_SIZE:
            self._add_chunk()
        index = self._top >> 3
        self._top += (nbytes + 7) & ~7
        return self._maps[-1], index, (len(self._maps) - 1) * _CHUNK_SIZE + index * 8

    def _key(self, name: str, kind: int) -> _Handle:
        self._check_open()
        known = self._handles.get(name) if isinstance(name, str) else None
        if known is not None:
            if known[0] != kind:
                raise TypeError(
                    f"key {name!r} is a {_KIND_NAMES[known[0]]}, not a {_KIND_NAMES[kind]}"
                )
            return known[1]
        raw = _encode_name(name)
        data, data_index, data_offset = self._allocate(_S_WORDS * 8 if kind == _SERIES else 8)
        padded = (len(raw) + 7) & ~7
        record, index, offset = self._allocate(_RECORD_HEAD + padded)
        body = _RECORD_BODY.pack(kind | len(raw) << 8, data_offset) + raw.ljust(padded, b"\0")
        start = (index + _R_META) * 8
        record.raw[start : start + len(body)] = body
        record.q[index + _R_COMMIT] = _record_check(body)
        if self._last_record:
            previous = self._maps[self._last_record // _CHUNK_SIZE]
            previous.q[(self._last_record % _CHUNK_SIZE >> 3) + _R_NEXT] = offset
        else:
            self._maps[0].q[_H_FIRST_KEY] = offset
        self._last_record = offset
        new: _Handle
        if kind == _COUNTER:
            new = _ShmCounter(self, name, data.d, data_index)
        elif kind == _GAUGE:
            new = _ShmGauge(self, name, data.d, data_index)
        else:
            new = _ShmSeries(self, name, data, data_index)
            self._series.append(new)
        self._handles[name] = (kind, new)
        return new

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"store {self.path!r} is closed")

    def _closed_error(self, kind: str, name: str) -> RuntimeError:
        return RuntimeError(f"{kind} {name!r}: its store {self.path!r} is closed")

    def _bad_value(self, kind: str, name: str, value: object, exc: Exception) -> Exception:
        if self._closed:
            return self._closed_error(kind, name)
        if isinstance(exc, OverflowError) or isinstance(value, int):
            return ValueError(f"{kind} {name!r}: {value!r} is out of the float64 range")
        return TypeError(
            f"{kind} {name!r}: {value!r} ({type(value).__name__}) is not a real number"
        )

    def _release(self) -> None:
        """Unmap every chunk and close the lock and the directory (which drops the lock)."""
        for mapping in self._maps:
            mapping.release()
        self._maps.clear()
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()
        for fd in (self._lock_fd, self._dir_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._dir_fd = -1

    def _remove_made(self) -> None:
        if self._made:
            with contextlib.suppress(KVStoreError):
                dir_fd = _open_dir(self.path, os.geteuid())
                try:
                    for name in reversed(self._made):
                        _remove(name, dir_fd)
                finally:
                    os.close(dir_fd)
            self._made.clear()
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def _abandon(self) -> None:
        """Undo a failed constructor: release what it holds and remove what it made."""
        self._release()
        self._remove_made()


def _writer_pid(dir_fd: int, path: str) -> str:
    """`` (pid N)``: the writer named in the header of chunk 0, or "" if it cannot be read."""
    try:
        fd = _open_file(dir_fd, path, _CHUNK_NAME.format(0), os.O_RDONLY, os.geteuid())
    except (OSError, KVStoreError):
        return ""
    try:
        header = os.pread(fd, _HEADER.size, 0)
    finally:
        os.close(fd)
    if len(header) < _HEADER.size:
        return ""
    return f" (pid {_HEADER.unpack(header)[_H_PID]})"


class SeriesSummary(msgspec.Struct, frozen=True):
    """A consistent summary of a series: every field describes the same prefix of it.

    ``count`` counts every value, ``nan_count`` the NaNs among them; the other fields describe
    the non-NaN values (NaN when there are none). Percentiles come from the histogram: within 1%
    of the exact value for normal floats, exact for 0 and ±inf.
    """

    count: int
    nan_count: int
    sum: float
    mean: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float


class _Published(NamedTuple):
    n: int
    nan: int
    sum: float
    min: float
    max: float
    buckets: dict[int, int]


class _Tail:
    """Count, NaN count, sum, min and max of the values after the published summary."""

    __slots__ = ("max", "min", "n", "nan", "sum")

    def __init__(self) -> None:
        self.n = 0
        self.nan = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, words: list[int], add_buckets: Callable[[dict[int, int]], None]) -> None:
        for start in range(0, len(words), _PUBLISH_EVERY):
            part = words[start : start + _PUBLISH_EVERY]
            batch = _fold(array("q", part).tobytes())
            self.n += len(part)
            self.nan += batch.nan
            self.sum += batch.sum
            self.min = min(self.min, batch.min)
            self.max = max(self.max, batch.max)
            add_buckets(batch.counts)


class _Hist:
    """Histogram buckets kept in value order: sort keys, representatives, counts, and the
    cumulative counts (brought up to date lazily from the first changed bucket)."""

    __slots__ = ("counts", "cumulative", "dirty", "reps", "sort_keys")

    def __init__(self, buckets: dict[int, int]) -> None:
        order = sorted(buckets, key=_sort_key)
        self.sort_keys = [_sort_key(key) for key in order]
        self.reps = [_representative(key) for key in order]
        self.counts = [buckets[key] for key in order]
        self.cumulative = list(accumulate(self.counts))
        self.dirty = len(self.counts)

    def add(self, buckets: dict[int, int]) -> None:
        sort_keys, counts, dirty = self.sort_keys, self.counts, self.dirty
        for key, n in buckets.items():
            sort_key = _sort_key(key)
            i = bisect_left(sort_keys, sort_key)
            if i < len(sort_keys) and sort_keys[i] == sort_key:
                counts[i] += n
            else:
                sort_keys.insert(i, sort_key)
                self.reps.insert(i, _representative(key))
                counts.insert(i, n)
            dirty = min(dirty, i)
        self.dirty = dirty

    def cumulate(self) -> list[int]:
        i = self.dirty
        if i < len(self.counts):
            start = self.cumulative[i - 1] if i else 0
            self.cumulative[i:] = islice(accumulate(self.counts[i:], initial=start), 1, None)
            self.dirty = len(self.counts)
        return self.cumulative


class _Stats:
    """One prefix of a series. Its lists are shared with the view's histogram, so a _Stats is
    only valid until the view's next read."""

    __slots__ = ("cumulative", "max", "min", "n", "nan", "reps", "sum")

    def __init__(self, pub: _Published, tail: _Tail, hist: _Hist) -> None:
        lo, hi = (pub.min, pub.max) if pub.n > pub.nan else (math.inf, -math.inf)
        self.n = pub.n + tail.n
        self.nan = pub.nan + tail.nan
        self.sum = pub.sum + tail.sum
        self.min = min(lo, tail.min)
        self.max = max(hi, tail.max)
        self.reps = hist.reps
        self.cumulative = hist.cumulate()

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        cumulative, reps, lo, hi = self.cumulative, self.reps, self.min, self.max
        if not cumulative:
            return [math.nan for _ in qs]
        last = cumulative[-1] - 1
        return [min(max(reps[bisect_right(cumulative, int(q * last / 100.0))], lo), hi) for q in qs]


def _check_percent(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise TypeError(f"percentile must be a number in [0, 100], got {type(q).__name__}: {q!r}")
    value = float(q)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentile {q!r} is not in [0, 100]")
    return value


class SeriesView:
    """A live, read-only view of one series, from :meth:`KVStoreReader.series`.

    Every call reads the shared memory afresh, so values appended since are included. ``len``,
    :meth:`mean`, :meth:`min`, :meth:`max`, the percentiles and :meth:`summary` each describe
    one prefix of the series; :meth:`values` returns an exact prefix from ``start``.
    """

    __slots__ = (
        "_block",
        "_hist",
        "_name",
        "_probe",
        "_pub",
        "_pub_raw",
        "_reader",
        "_stats",
        "_tail",
        "_word",
    )

    def __init__(self, reader: KVStoreReader, name: str, block: _Mapping, word: int) -> None:
        self._reader = reader
        self._name = name
        self._block = block
        self._word = word
        self._pub_raw = b""
        self._pub = _Published(0, 0, 0.0, math.inf, -math.inf, {})
        self._hist = _Hist({})
        self._tail = _Tail()
        self._probe: tuple[int, memoryview[int], int, int] | None = None
        self._stats: tuple[tuple[bytes, int], _Stats] | None = None

    @property
    def name(self) -> str:
        """The key of the series."""
        return self._name

    def __len__(self) -> int:
        return self._read().n

    def mean(self) -> float:
        """The mean of the non-NaN values (NaN when there are none)."""
        stats = self._read()
        numeric = stats.n - stats.nan
        return stats.sum / numeric if numeric else math.nan

    def min(self) -> float:
        """The smallest non-NaN value (NaN when there are none)."""
        stats = self._read()
        return stats.min if stats.n > stats.nan else math.nan

    def max(self) -> float:
        """The largest non-NaN value (NaN when there are none)."""
        stats = self._read()
        return stats.max if stats.n > stats.nan else math.nan

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (``q`` in [0, 100]) of the non-NaN values, from the histogram.

        It estimates the k-th smallest value, k = floor(q * (n - 1) / 100) (numpy's "lower"
        method), within 1% for normal floats and exactly for 0 and ±inf; NaN when empty.
        """
        return self._read().percentiles([_check_percent(q)])[0]

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        """:meth:`percentile` for each of ``qs``, all from the same prefix of the series."""
        checked = [_check_percent(q) for q in qs]
        return self._read().percentiles(checked)

    def summary(self) -> SeriesSummary:
        """Count, NaN count, sum, mean, min, max, p50, p90 and p99, all of the same prefix."""
        stats = self._read()
        numeric = stats.n - stats.nan
        p50, p90, p99 = stats.percentiles((50.0, 90.0, 99.0))
        return SeriesSummary(
            count=stats.n,
            nan_count=stats.nan,
            sum=stats.sum,
            mean=stats.sum / numeric if numeric else math.nan,
            min=stats.min if numeric else math.nan,
            max=stats.max if numeric else math.nan,
            p50=p50,
            p90=p90,
            p99=p99,
        )

    def values(self, start: int = 0) -> list[float]:
        """The values from index ``start`` on: an exact prefix of what the writer appended.

        Call it again with ``start`` = the number of values seen so far to read incrementally.
        Sort the result for exact percentiles.
        """
        if not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        self._reader._check_open()
        hint = self._block.q[self._word + _S_COUNT] + _PUBLISH_EVERY
        return _decode(self._words(start, hint))

    def __repr__(self) -> str:
        return f"<SeriesView {self._name!r} of {self._reader!r}>"

    def _segment(self, i: int) -> tuple[memoryview[int], int, int] | None:
        """Where value ``i`` lives: the chunk's words, the word index of value ``i`` and of the
        end of its segment; ``None`` if its segment is not allocated (or visible) yet."""
        k = bisect_right(_VSEG_START, i) - 1
        if k >= _VSEG_SLOTS:
            return None
        located = self._segment_at(_S_VSEGS, k, _vseg_capacity, 8, "value")
        if located is None:
            return None
        mapping, first = located
        base = first - _VSEG_START[k]
        return mapping.q, base + i, base + _VSEG_START[k + 1]

    def _segment_at(
        self, table: int, k: int, capacity: Callable[[int], int], entry_bytes: int, what: str
    ) -> tuple[_Mapping, int] | None:
        """The mapping and first word of segment ``k`` of a segment table; ``None`` if it is not
        allocated (or visible) yet. The writer allocates segments in order, each after the
        last, so a pointer that overlaps the previous segment is corruption."""
        pointer = self._block.q[self._word + table + k]
        if not pointer:
            return None
        if k:
            previous = self._block.q[self._word + table + k - 1]
            if not previous:
                return None
            if pointer < previous + capacity(k - 1) * entry_bytes:
                raise KVStoreError(
                    f"corrupt store {self._reader.path!r}: series {self._name!r} {what} "
                    f"segment {k} at {pointer} overlaps segment {k - 1} at {previous}"
                )
        return self._reader._locate(
            pointer, capacity(k) * entry_bytes, f"series {self._name!r} {what} segment {k}"
        )

    def _words(self, start: int, stop: int) -> list[int]:
        """The stored words of values [start, stop), up to the first one not written yet."""
        out: list[int] = []
        while start < stop:
            where = self._segment(start)
            if where is None:
                break
            view, first, end = where
            words = view[first : min(end, first + stop - start)].tolist()
            if 0 in words:
                out += words[: words.index(0)]
                break
            out += words
            start += len(words)
        return out

    def _read(self) -> _Stats:
        self._reader._check_open()
        pub = self._published()
        tail = self._read_tail(pub.n)
        key = (self._pub_raw, tail.n)
        if self._stats is None or self._stats[0] != key:
            self._stats = (key, _Stats(pub, tail, self._hist))
        return self._stats[1]

    def _published(self) -> _Published:
        """The last summary the writer committed, validated against its check word."""
        start = self._word * 8
        view = self._block.raw
        raw = bytes(view[start : start + _SUMMARY.size])
        if raw == self._pub_raw:
            return self._pub
        for _ in range(_READ_ATTEMPTS):
            pub = self._validate(raw)
            if pub is not None:
                break
            os.sched_yield()
            raw = bytes(view[start : start + _SUMMARY.size])
        else:
            pub = self._recount()
        self._pub_raw, self._pub = raw, pub
        self._hist = _Hist(pub.buckets)
        self._tail = _Tail()
        return pub

    def _validate(self, raw: bytes) -> _Published | None:
        n, nan, sum_bits, min_bits, max_bits, entries, check = _SUMMARY.unpack(raw)
        if entries > _BSEG_START[-1]:
            return None
        reader = self._reader
        keys: list[int] = []
        counts: list[int] = []
        k = 0
        while len(keys) < entries:
            if k == _BSEG_SLOTS:
                return None
            located = self._segment_at(_S_BSEGS, k, _bseg_capacity, 16, "histogram")
            if located is None:
                return None
            mapping, base = located
            take = min(_bseg_capacity(k), entries - len(keys))
            pairs = mapping.q[base : base + 2 * take].tolist()
            keys += pairs[0::2]
            counts += pairs[1::2]
            k += 1
        digest = sum(map(mul, counts, map(_weight, keys))) % _P
        if _summary_check((n, nan, sum_bits, min_bits, max_bits, entries), digest) != check:
            return None
        if (
            any(not 0 <= key <= _M18 or _is_nan_key(key) for key in keys)
            or min(counts, default=0) < 0
        ):
            raise KVStoreError(
                f"corrupt store {reader.path!r}: series {self._name!r} has a histogram entry "
                "that no writer makes"
            )
        return _Published(
            n,
            nan,
            _from_bits(sum_bits),
            _from_bits(min_bits),
            _from_bits(max_bits),
            dict(zip(keys, counts, strict=True)),
        )

    def _recount(self) -> _Published:
        """Summarise every readable value: for a summary that never validates (its writer died
        while committing it)."""
        total = _Tail()
        buckets: collections.Counter[int] = collections.Counter()
        total.add(self._words(0, _VSEG_START[-1]), buckets.update)
        return _Published(total.n, total.nan, total.sum, total.min, total.max, dict(buckets))

    def _read_tail(self, published: int) -> _Tail:
        """Fold in the values written after the published summary that were not seen yet."""
        tail = self._tail
        start = published + tail.n
        stop = published + _PUBLISH_EVERY
        where = self._probe[1:] if self._probe is not None and self._probe[0] == start else None
        step = 64
        while start < stop:
            where = where or self._segment(start)
            if where is None:
                break
            view, first, end = where
            if not view[first]:
                break
            words = view[first : min(end, first + stop - start, first + step)].tolist()
            if 0 in words:
                words = words[: words.index(0)]
            tail.add(words, self._hist.add)
            start += len(words)
            first += len(words)
            where = (view, first, end) if first < end else None
            step *= 4
        self._probe = None if where is None else (start, *where)
        return tail


class _KeyInfo(NamedTuple):
    kind: int
    mapping: _Mapping
    word: int


class KVStoreReader(Resource):
    """A read-only view of a store written by a :class:`BasicKVStore`, in any process.

    Opening a path that is not a store, a truncated store or a store of another format version
    raises :class:`KVStoreError`. Keys and values the writer adds later become visible without
    reopening. Readers take no lock and never block the writer. Not thread-safe; a context
    manager that closes on exit.
    """

    def __init__(self, path: str | os.PathLike[str], *, owner: int | None = None) -> None:
        self.path = os.fspath(path)
        self._owner = os.geteuid() if owner is None else owner
        self._closed = False
        self._maps: dict[int, _Mapping] = {}
        self._keys: dict[str, _KeyInfo] = {}
        self._views: dict[str, SeriesView] = {}
        self._last_record = 0
        self._dir_fd = _open_dir(self.path, self._owner)
        try:
            self._map(0)
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        """Every key, in creation order."""
        self._check_open()
        self._refresh()
        return list(self._keys)

    def get(self, name: str) -> float:
        """The value of counter or gauge ``name``; ``KeyError`` if there is none."""
        info = self._info(name)
        if info.kind == _SERIES:
            raise TypeError(f"key {name!r} is a series: read it with series({name!r})")
        return info.mapping.d[info.word]

    def series(self, name: str) -> SeriesView:
        """A live view of series ``name``; ``KeyError`` if there is none."""
        view = self._views.get(name)
        if view is not None:
            self._check_open()
            return view
        info = self._info(name)
        if info.kind != _SERIES:
            raise TypeError(f"key {name!r} is a {_KIND_NAMES[info.kind]}, not a series")
        view = self._views[name] = SeriesView(self, name, info.mapping, info.word)
        return view

    def snapshot(self) -> dict[str, float | SeriesSummary]:
        """Every key with its value (counters and gauges) or :class:`SeriesSummary`."""
        self._check_open()
        self._refresh()
        out: dict[str, float | SeriesSummary] = {}
        for name, info in self._keys.items():
            if info.kind == _SERIES:
                out[name] = self.series(name).summary()
            else:
                out[name] = info.mapping.d[info.word]
        return out

    def to_prometheus(self, prefix: str = "") -> str:
        """The store in the Prometheus text format (0.0.4).

        Counters become ``<name>_total`` counters, gauges gauges, and series summaries with the
        0.5, 0.9 and 0.99 quantiles plus ``_sum`` and ``_count`` (of the non-NaN values). Names
        are ``prefix + key`` with every character outside ``[a-zA-Z0-9_:]`` replaced by ``_``
        (and ``_`` put before a leading digit); names that collide get a ``_2``, ``_3``... suffix.
        """
        lines: list[str] = []
        used: set[str] = set()
        for name, value in self.snapshot().items():
            kind = self._keys[name].kind
            metric = _metric_name(prefix + name, kind, used)
            family = f"{metric}_total" if kind == _COUNTER else metric
            help_text = f"wirebus {_KIND_NAMES[kind]} {name!r}".replace("\\", "\\\\")
            lines.append(f"# HELP {family} {help_text}")
            if isinstance(value, SeriesSummary):
                lines.append(f"# TYPE {metric} summary")
                for q, v in (("0.5", value.p50), ("0.9", value.p90), ("0.99", value.p99)):
                    lines.append(f'{metric}{{quantile="{q}"}} {_prom_float(v)}')
                lines.append(f"{metric}_sum {_prom_float(value.sum)}")
                lines.append(f"{metric}_count {value.count - value.nan_count}")
            else:
                lines.append(f"# TYPE {family} {_KIND_NAMES[kind]}")
                lines.append(f"{family} {_prom_float(value)}")
        return "\n".join(lines) + "\n" if lines else ""

    def close(self) -> None:
        """Unmap the store; the reader and its views raise ``RuntimeError`` afterwards."""
        self._closed = True
        for mapping in self._maps.values():
            mapping.release()
        self._maps.clear()
        self._keys.clear()
        self._views.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __repr__(self) -> str:
        return f"<KVStoreReader {self.path!r}{' (closed)' if self._closed else ''}>"

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"reader of {self.path!r} is closed")

    def _info(self, name: str) -> _KeyInfo:
        self._check_open()
        info = self._keys.get(name) if isinstance(name, str) else None
        if info is None:
            self._refresh()
            info = self._keys.get(name) if isinstance(name, str) else None
            if info is None:
                raise KeyError(f"no key {name!r} in store {self.path!r}")
        return info

    def _map(self, index: int) -> _Mapping | None:
        """The mapping of chunk ``index``; ``None`` if that chunk is not visible yet."""
        mapping = self._maps.get(index)
        if mapping is not None:
            return mapping
        name = os.path.join(self.path, _CHUNK_NAME.format(index))
        try:
            fd = _open_file(
                self._dir_fd, self.path, _CHUNK_NAME.format(index), os.O_RDONLY, self._owner
            )
        except FileNotFoundError:
            if index == 0:
                raise KVStoreError(
                    f"{self.path!r} is not a store: it has no {_CHUNK_NAME.format(0)}"
                ) from None
            return None
        try:
            size = os.fstat(fd).st_size
            header = os.pread(fd, _HEADER.size, 0)
            if len(header) < _HEADER.size:
                raise KVStoreError(f"{name!r} is truncated: {size} bytes")
            words = _HEADER.unpack(header)
            if words[_H_MAGIC] != _MAGIC:
                raise KVStoreError(f"{name!r} is not a wirebus store (magic {header[:8]!r})")
            if words[_H_VERSION] != _VERSION:
                raise KVStoreError(
                    f"{name!r} has format version {words[_H_VERSION]}; this reader reads "
                    f"version {_VERSION}"
                )
            if words[_H_CHUNK_SIZE] != _CHUNK_SIZE:
                raise KVStoreError(
                    f"{name!r} has a corrupt header: chunk size {words[_H_CHUNK_SIZE]} "
                    f"(format version {_VERSION} has {_CHUNK_SIZE})"
                )
            if words[_H_INDEX] != index:
                raise KVStoreError(f"{name!r} has a corrupt header: index {words[_H_INDEX]}")
            if size != _CHUNK_SIZE:
                raise KVStoreError(f"{name!r} is truncated: {size} of {_CHUNK_SIZE} bytes")
            mm = mmap.mmap(fd, _CHUNK_SIZE, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise KVStoreError(f"cannot map {name!r}: {exc}") from exc
        finally:
            os.close(fd)
        mapping = self._maps[index] = _Mapping(mm)
        return mapping

    def _locate(self, offset: int, nbytes: int, what: str) -> tuple[_Mapping, int] | None:
        """The mapping and word index of the ``nbytes`` at store offset ``offset``; ``None`` if
        their chunk is not visible yet. ``KVStoreError`` if they are not inside one chunk's
        allocatable space: no writer ever stores such a pointer."""
        chunk, start = divmod(offset, _CHUNK_SIZE)
        if offset <= 0 or offset % 8 or start < _CHUNK_HEADER or start + nbytes > _CHUNK_SIZE:
            raise KVStoreError(f"corrupt store {self.path!r}: {what} at offset {offset}")
        mapping = self._map(chunk)
        return None if mapping is None else (mapping, start >> 3)

    def _refresh(self) -> None:
        """Follow the chain of key records past the last one read, stopping at the first one
        not (yet) committed. The allocator hands out increasing offsets, so a ``next`` that
        does not point forward is corruption (and would loop)."""
        if self._last_record:
            located = self._locate(self._last_record, _RECORD_HEAD, "key record")
            assert located is not None
            offset = located[0].q[located[1] + _R_NEXT]
        else:
            offset = self._maps[0].q[_H_FIRST_KEY]
        while offset:
            if offset <= self._last_record:
                raise KVStoreError(
                    f"corrupt store {self.path!r}: the key record at {self._last_record} has "
                    f"next {offset}, not after it"
                )
            record = self._read_record(offset)
            if record is None:
                return
            name, info, next_offset = record
            self._keys[name] = info
            self._last_record = offset
            offset = next_offset

    def _read_record(self, offset: int) -> tuple[str, _KeyInfo, int] | None:
        located = self._locate(offset, _RECORD_HEAD, "key record")
        if located is None:
            return None
        mapping, index = located
        meta = mapping.q[index + _R_META]
        kind, size = meta & 0xFF, meta >> 8
        start = index * 8
        end = start + _RECORD_HEAD + ((size + 7) & ~7)
        if kind not in _KIND_NAMES or not 0 < size <= _MAX_KEY_BYTES or end > _CHUNK_SIZE:
            return None
        raw = bytes(mapping.raw[start:end])
        if int.from_bytes(raw[:8], "little") != _record_check(raw[_R_META * 8 :]):
            return None
        data = int.from_bytes(raw[_R_DATA * 8 : _R_DATA * 8 + 8], "little", signed=True)
        target = self._locate(data, _S_WORDS * 8 if kind == _SERIES else 8, "key data")
        if target is None:
            return None
        try:
            name = raw[_RECORD_HEAD : _RECORD_HEAD + size].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise KVStoreError(f"corrupt store {self.path!r}: key name {exc}") from None
        return name, _KeyInfo(kind, *target), mapping.q[index + _R_NEXT]


def _metric_name(name: str, kind: int, used: set[str]) -> str:
    base = _NAME_INVALID.sub("_", name)
    if not re.match(r"[a-zA-Z_:]", base):
        base = "_" + base
    if kind == _COUNTER and base.endswith("_total"):
        base = base[: -len("_total")]
    suffixes = {_COUNTER: ("_total",), _GAUGE: ("",), _SERIES: ("", "_sum", "_count")}[kind]
    candidate, n = base, 1
    while any(candidate + s in used for s in suffixes):
        n += 1
        candidate = f"{base}_{n}"
    used.update(candidate + s for s in suffixes)
    used.add(candidate)
    return candidate


def _prom_float(value: float) -> str:
    if value != value:
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def cleanup_stale(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the stores in ``directory`` whose writer is gone, and return their paths.

    Each subdirectory holding a wirebus store is checked (``directory`` defaults to where
    :class:`BasicKVStore` makes stores: ``/dev/shm`` or the temp dir). A store is stale when its
    writer no longer holds the lock: it died, or it closed without unlinking. Only the store's
    own files are removed, then the directory if that left it empty. Anything that
    :func:`remove_store` would refuse (another user's directory, one others may write, a
    symlink, a FIFO, a live store) is left alone.
    """
    base = _paths.shm_dir() if directory is None else os.fspath(directory)
    removed = []
    with os.scandir(base) as entries:
        candidates = sorted(e.path for e in entries if e.is_dir(follow_symlinks=False))
    for path in candidates:
        with contextlib.suppress(KVStoreError):
            remove_store(path)
            removed.append(path)
    return removed


def remove_store(path: str | os.PathLike[str]) -> None:
    """Remove the store at ``path``, whose writer is gone: its files, then the directory if
    that left it empty.

    The same trust rules as the writer's apply: ``KVStoreError`` if ``path`` is a symlink, is
    not owned by this user, may be written by group or others, is not a wirebus store, or its
    writer still holds the lock (the error names its pid). Nothing is removed then.
    """
    path = os.fspath(path)
    owner = os.geteuid()
    dir_fd = _open_dir(path, owner)
    lock_fd = -1
    try:
        try:
            chunk = _open_file(dir_fd, path, _CHUNK_NAME.format(0), os.O_RDONLY, owner)
        except FileNotFoundError:
            raise KVStoreError(
                f"{path!r} is not a store: it has no {_CHUNK_NAME.format(0)}"
            ) from None
        try:
            magic = os.pread(chunk, 8, 0)
        finally:
            os.close(chunk)
        if magic != _MAGIC.to_bytes(8, "little"):
            raise KVStoreError(f"{path!r} is not a wirebus store (magic {magic!r})")
        with contextlib.suppress(FileNotFoundError):
            lock_fd = _open_file(dir_fd, path, _LOCK_NAME, os.O_RDWR, owner)
        if lock_fd >= 0:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KVStoreError(
                    f"store {path!r} still has a writer{_writer_pid(dir_fd, path)}"
                ) from None
        for entry in os.listdir(dir_fd):
            if _STORE_FILE.fullmatch(entry):
                _remove(entry, dir_fd)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)
