"""The single writer: :class:`BasicKVStore` and the handles it gives out."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
import weakref
from array import array
from collections.abc import Collection, Iterable, Mapping
from itertools import repeat
from operator import add
from types import TracebackType
from typing import cast

from wirebus import _paths
from wirebus.errors import KVStoreError
from wirebus.kvstore import _layout as layout
from wirebus.kvstore import _names
from wirebus.kvstore._files import (
    MappedChunk,
    check_mode,
    create_chunk,
    create_lock,
    directory_mode,
    open_dir,
    open_file,
    remove,
    writer_pid,
)
from wirebus.kvstore._histogram import BATCH, fold
from wirebus.kvstore._interface import Counter, Gauge, KVStore, Series


class _Chunks:
    """The writer's chunk files, mapped, and the bump allocator that hands out their space.

    Space is never freed or reused, and offsets only grow: readers rely on both.
    """

    __slots__ = ("closed", "dir_fd", "made", "maps", "mode", "path", "top")

    def __init__(self, path: str, dir_fd: int, mode: int) -> None:
        self.path = path
        self.dir_fd = dir_fd
        self.mode = mode
        self.maps: list[MappedChunk] = []
        self.made = 0  # chunk files made, mapped or not
        self.top = layout.CHUNK_SIZE
        self.closed = False

    def add(self) -> None:
        """Add a chunk; its space is handed out from then on."""
        self.maps.append(create_chunk(self.dir_fd, self.path, len(self.maps), self.mode))
        self.made += 1
        self.top = layout.first_free_word() * 8

    def allocate(self, nbytes: int) -> tuple[MappedChunk, int, int]:
        """``nbytes`` fresh (zeroed) bytes: their chunk, word index and store offset."""
        if self.top + nbytes > layout.CHUNK_SIZE:
            self.add()
        word = self.top >> 3
        self.top += (nbytes + 7) & ~7
        return self.maps[-1], word, layout.store_offset(len(self.maps) - 1, word)

    def at(self, offset: int) -> tuple[MappedChunk, int]:
        """The chunk and word index of store ``offset`` (one this allocator handed out)."""
        located = layout.locate(offset, 8)
        assert located is not None, offset
        return self.maps[located[0]], located[1]

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"store {self.path!r} is closed")

    def closed_error(self, kind: str, name: str) -> RuntimeError:
        return RuntimeError(f"{kind} {name!r}: its store {self.path!r} is closed")

    def bad_value(self, kind: str, name: str, value: object, exc: Exception) -> Exception:
        """The error for a value a handle could not store (``exc`` says why)."""
        if self.closed:
            return self.closed_error(kind, name)
        if isinstance(exc, OverflowError) or isinstance(value, int):
            return ValueError(f"{kind} {name!r}: {value!r} is out of the float64 range")
        return TypeError(
            f"{kind} {name!r}: {value!r} ({type(value).__name__}) is not a real number"
        )

    def release(self) -> None:
        """Unmap every chunk; handles then raise instead of touching freed memory."""
        self.closed = True
        for mapping in self.maps:
            mapping.release()
        self.maps.clear()


class _ShmValue:
    """A counter's or gauge's word: one aligned float64 store per ``set``."""

    __slots__ = ("_chunks", "_floats", "_kind", "_name", "_word")

    def __init__(
        self, chunks: _Chunks, kind: str, name: str, floats: memoryview[float], word: int
    ) -> None:
        self._chunks = chunks
        self._kind = kind
        self._name = name
        self._floats = floats
        self._word = word

    def set(self, value: float) -> None:
        try:
            self._floats[self._word] = value
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._chunks.bad_value(self._kind, self._name, value, exc) from None

    @property
    def value(self) -> float:
        try:
            return self._floats[self._word]
        except ValueError:
            raise self._chunks.closed_error(self._kind, self._name) from None

    def __repr__(self) -> str:
        return f"<{self._kind} {self._name!r} of store {self._chunks.path!r}>"


class _ShmCounter(_ShmValue, Counter):
    __slots__ = ()

    def inc(self, n: float = 1.0) -> None:
        try:
            if n >= 0.0:
                self._floats[self._word] += n
                return
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._chunks.bad_value("counter", self._name, n, exc) from None
        raise ValueError(f"counter {self._name!r}: increment {n!r} is negative or NaN")


class _ShmGauge(_ShmValue, Gauge):
    __slots__ = ()


class _ShmSeries(Series):
    """The writer's side of a series.

    Values go to the current segment with one store each, through a *window*: views of the
    next ``BATCH`` words (fewer at the segment's end), so the store that falls off its end
    (``IndexError``) is the signal to publish. Then the batch is folded into the shared summary
    and histogram, which are committed with a check word (see docs/kvstore.md).
    """

    __slots__ = (
        "_before",
        "_block",
        "_chunks",
        "_entries",
        "_entry_keys",
        "_hi",
        "_histogram",
        "_histogram_segments",
        "_i",
        "_lo",
        "_name",
        "_nan",
        "_published",
        "_segment",
        "_segment_chunk",
        "_segment_end",
        "_segment_start",
        "_series_chunk",
        "_sum",
        "_window",
        "_window_start",
        "_window_words",
    )

    def __init__(self, chunks: _Chunks, name: str, series_chunk: MappedChunk, block: int) -> None:
        self._chunks = chunks
        self._name = name
        self._series_chunk = series_chunk  # the chunk holding the series block
        self._block = block  # the block's word index in it
        self._segment_chunk = series_chunk  # the chunk of the current value segment
        self._segment = -1
        self._before = 0  # values in the segments before the current one
        self._published = self._segment_start = self._segment_end = 0  # word indexes
        self._window_start = self._i = 0  # word index of the window, index in it
        self._window = series_chunk.floats[0:0]
        self._window_words = series_chunk.words[0:0]
        self._nan = 0
        self._sum = 0.0
        self._lo = math.inf
        self._hi = -math.inf
        self._entries = 0
        self._histogram_segments: list[tuple[memoryview[int], int]] = []
        self._histogram = array("q")  # every entry's key and count, as the segments hold them
        self._entry_keys: dict[int, None] = {}  # the entries' bucket keys, in entry order

    def append(self, value: float) -> None:
        i = self._i
        try:
            if value:
                self._window[i] = value
            else:
                self._window_words[i] = (
                    layout.ZERO_POS_BITS if math.copysign(1.0, value) > 0 else layout.ZERO_NEG_BITS
                )
        except IndexError:  # the window is full
            self._next_window()
            self.append(value)
            return
        except (TypeError, ValueError, OverflowError) as exc:
            raise self._chunks.bad_value("series", self._name, value, exc) from None
        self._i = i + 1

    def extend(self, values: Iterable[float]) -> None:
        append = self.append
        for value in values:
            append(value)

    def __len__(self) -> int:
        return self._before + self._window_start + self._i - self._segment_start

    def __repr__(self) -> str:
        return f"<series {self._name!r} ({len(self)} values) of store {self._chunks.path!r}>"

    def publish(self) -> None:
        """Fold the values appended since the last publication into the shared summary and
        histogram, and commit them with the check word."""
        start, end = self._published, self._window_start + self._i
        if start == end:
            return
        batch = fold(bytes(self._segment_chunk.raw[start * 8 : end * 8]))
        counts, histogram = batch.counts, self._histogram
        if not self._entry_keys.keys() >= counts.keys():
            self._add_entries(counts.keys() - self._entry_keys.keys())
        more = map(counts.get, self._entry_keys, repeat(0))
        histogram[1::2] = array("q", map(add, histogram[1::2], more))
        self._write_histogram()
        digest = layout.histogram_digest([histogram.tobytes()])
        self._nan += batch.nan
        self._sum += batch.sum
        self._lo = min(self._lo, batch.min)
        self._hi = max(self._hi, batch.max)
        count = self._before + end - self._segment_start
        summary = layout.Summary(count, self._nan, self._sum, self._lo, self._hi, self._entries, 0)
        chunk = self._series_chunk
        layout.write_summary(chunk.words, chunk.floats, self._block, summary, digest)
        self._published = end

    def release(self) -> None:
        """Drop the window's views (before the store unmaps its chunks); appends then raise."""
        self._window.release()
        self._window_words.release()

    def _next_window(self) -> None:
        """Publish what the full window holds and open the next one, in a new segment when
        the current one is full."""
        self._chunks.check_open()
        self.publish()
        start = self._window_start + self._i
        if start == self._segment_end:
            self._next_segment()
            start = self._segment_start
        end = min(start + BATCH, self._segment_end)
        self.release()
        self._window = self._segment_chunk.floats[start:end]
        self._window_words = self._segment_chunk.words[start:end]
        self._window_start, self._i = start, 0

    def _next_segment(self) -> None:
        k = self._segment + 1
        if k == layout.VALUE_SEGMENTS:
            raise KVStoreError(f"series {self._name!r} is full: it holds {len(self)} values")
        capacity = layout.value_segment_capacity(k)
        mapping, word, offset = self._chunks.allocate(capacity * layout.VALUE_BYTES)
        layout.set_value_segment(self._series_chunk.words, self._block, k, offset)
        if k:
            self._before += layout.value_segment_capacity(k - 1)
        self._segment = k
        self._segment_chunk = mapping
        self._segment_start = self._published = word
        self._segment_end = word + capacity

    def _add_entries(self, keys: Collection[int]) -> None:
        """Add histogram entries (count 0) for buckets ``keys``, allocating segments first."""
        segments = self._histogram_segments
        while layout.HISTOGRAM_SEGMENT_START[len(segments)] < self._entries + len(keys):
            k = len(segments)
            nbytes = layout.histogram_segment_capacity(k) * layout.ENTRY_BYTES
            mapping, word, offset = self._chunks.allocate(nbytes)
            layout.set_histogram_segment(self._series_chunk.words, self._block, k, offset)
            segments.append((mapping.words, word))
        for key in keys:
            self._histogram.extend((key, 0))
            self._entry_keys[key] = None
        self._entries += len(keys)

    def _write_histogram(self) -> None:
        """Copy every entry into the shared segments. A copy need not be word by word: the
        check word makes readers retry until entries and summary agree."""
        starts = layout.HISTOGRAM_SEGMENT_START
        for k, (view, first) in enumerate(self._histogram_segments):
            lo, hi = 2 * starts[k], 2 * min(starts[k + 1], self._entries)
            if lo >= hi:
                break
            view[first : first + hi - lo] = self._histogram[lo:hi]


_Handle = _ShmCounter | _ShmGauge | _ShmSeries


class BasicKVStore(KVStore):
    """The single writer of a store: a directory of fixed-size chunk files mapped into memory.

    ``path`` is the store directory; ``None`` makes a fresh private one under ``/dev/shm`` (the
    platform's temp dir where that does not exist). A given path is created if missing; an
    existing directory must be empty, owned by this user and writable by nobody else, and is
    never reached through a symlink. The directory is ``0o700`` and files get ``mode`` (owner
    read-write; group/other may read). A second writer on the same path gets
    :class:`KVStoreError`: the writer holds an exclusive ``flock`` on the store's lock file for
    its lifetime. If the constructor fails it removes everything it made.

    Handles are not thread-safe: use a store from one thread. ``close()`` keeps the files for
    readers; ``unlink()`` removes them. As a context manager (``with`` or ``async with``) the
    store closes on exit and unlinks too when it created the directory itself.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, mode: int = 0o600) -> None:
        self._mode = check_mode(mode)
        self._closed = True
        self._unlinked = False
        self._created_dir = False
        self._lock_fd = -1
        self._owns_lock_file = False
        self._handles: dict[str, tuple[int, _Handle]] = {}
        self._series: list[_ShmSeries] = []
        self._last_record = 0
        self.path = _paths.shm_dir() if path is None else os.fspath(path)
        self._chunks = _Chunks(self.path, -1, self._mode)
        try:
            self._chunks.dir_fd = self._make_dir(path is None)
            self._take_lock()
            self._chunks.add()
        except BaseException:
            self._abandon()
            raise
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self._lock_fd, self._chunks.dir_fd)

    def counter(self, name: str, *, labels: Mapping[str, str] | None = None) -> Counter:
        return cast(Counter, self._key(name, labels, layout.COUNTER))

    def gauge(self, name: str, *, labels: Mapping[str, str] | None = None) -> Gauge:
        return cast(Gauge, self._key(name, labels, layout.GAUGE))

    def series(self, name: str, *, labels: Mapping[str, str] | None = None) -> Series:
        return cast(Series, self._key(name, labels, layout.SERIES))

    def close(self) -> None:
        """Publish pending series values and release the mappings and the writer lock.

        The files stay for readers (and :func:`cleanup_stale` now counts the store as stale).
        """
        if self._closed:
            return
        self._closed = True
        for series in self._series:
            with contextlib.suppress(KVStoreError):  # an unpublished tail stays readable
                series.publish()
            series.release()
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

    def _make_dir(self, fresh: bool) -> int:
        """Make the store directory, or take an existing one this user owns and only this user
        may write, never through a symlink; return its descriptor."""
        try:
            if fresh:
                self.path = self._chunks.path = tempfile.mkdtemp(
                    prefix="wirebus-kv-", dir=self.path
                )
                self._created_dir = True
            else:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path, 0o700)
                    self._created_dir = True
        except OSError as exc:
            raise KVStoreError(f"cannot create store directory {self.path!r}: {exc}") from exc
        dir_fd = open_dir(self.path, os.geteuid())
        if self._created_dir:
            os.fchmod(dir_fd, directory_mode(self._mode))
        return dir_fd

    def _take_lock(self) -> None:
        dir_fd = self._chunks.dir_fd
        try:
            try:
                self._lock_fd = create_lock(dir_fd, self._mode)
                self._owns_lock_file = True
            except FileExistsError:
                self._lock_fd = open_file(
                    dir_fd, self.path, layout.LOCK_NAME, os.O_RDWR, os.geteuid()
                )
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KVStoreError(
                f"store {self.path!r} already has a writer{writer_pid(dir_fd, self.path)}"
            ) from None
        except OSError as exc:
            lock = os.path.join(self.path, layout.LOCK_NAME)
            raise KVStoreError(f"cannot lock {lock!r}: {exc}") from exc
        others = sorted(set(os.listdir(dir_fd)) - {layout.LOCK_NAME})
        if layout.CHUNK_NAME.format(0) in others:
            raise KVStoreError(
                f"{self.path!r} holds a store whose writer is gone; remove it with "
                "remove_store() or choose another path"
            )
        if others:
            raise KVStoreError(f"{self.path!r} is not empty: it holds {others[:3]!r}")
        self._owns_lock_file = True

    def _key(self, name: str, labels: Mapping[str, str] | None, kind: int) -> _Handle:
        self._chunks.check_open()
        key = _names.key(name, labels)
        known = self._handles.get(key)
        if known is not None:
            if known[0] != kind:
                raise TypeError(
                    f"key {key!r} is a {layout.KIND_NAMES[known[0]]}, "
                    f"not a {layout.KIND_NAMES[kind]}"
                )
            return known[1]
        raw = _names.encode(key)
        chunks = self._chunks
        data, data_word, data_offset = chunks.allocate(layout.data_bytes(kind))
        record, word, offset = chunks.allocate(layout.record_bytes(raw))
        layout.write_record(record.words, record.raw, word, kind, raw, data_offset)
        if self._last_record:
            previous, previous_word = chunks.at(self._last_record)
            layout.link_record(previous.words, previous_word, offset)
        else:
            layout.set_first_key(chunks.maps[0].words, offset)
        self._last_record = offset
        new: _Handle
        if kind == layout.COUNTER:
            new = _ShmCounter(chunks, "counter", key, data.floats, data_word)
        elif kind == layout.GAUGE:
            new = _ShmGauge(chunks, "gauge", key, data.floats, data_word)
        else:
            new = _ShmSeries(chunks, key, data, data_word)
            self._series.append(new)
        self._handles[key] = (kind, new)
        return new

    def _release(self) -> None:
        """Unmap every chunk and close the lock and the directory (which drops the lock)."""
        self._chunks.release()
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()
        for fd in (self._lock_fd, self._chunks.dir_fd):
            if fd >= 0:
                os.close(fd)
        self._lock_fd = self._chunks.dir_fd = -1

    def _remove_made(self) -> None:
        made = [layout.CHUNK_NAME.format(i) for i in reversed(range(self._chunks.made))]
        if self._owns_lock_file:
            made.append(layout.LOCK_NAME)
        if made:
            with contextlib.suppress(KVStoreError):
                dir_fd = open_dir(self.path, os.geteuid())
                try:
                    for name in made:
                        remove(name, dir_fd)
                finally:
                    os.close(dir_fd)
        self._chunks.made = 0
        self._owns_lock_file = False
        if self._created_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def _abandon(self) -> None:
        """Undo a failed constructor: release what it holds and remove what it made."""
        self._release()
        self._remove_made()


def _close_fds(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
