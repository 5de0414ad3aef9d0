"""Readers: :class:`KVStoreReader` and :class:`SeriesView`, in any process, lock-free.

Whatever bytes the files hold, a reader returns values or raises ``KVStoreError`` in bounded
time: pointers must lie inside one chunk, key records must point forward, segments must follow
each other, and a published summary is used only when its check word matches.
"""

from __future__ import annotations

import collections
import math
import numbers
import os
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

from wirebus._resource import Resource
from wirebus.errors import KVStoreError
from wirebus.kvstore import _layout as layout
from wirebus.kvstore import _names
from wirebus.kvstore._export import render_prometheus
from wirebus.kvstore._files import MappedChunk, map_chunk, open_dir
from wirebus.kvstore._histogram import BATCH, Histogram, Tail, is_bucket_key, percentiles
from wirebus.kvstore._interface import SeriesSummary

_READ_ATTEMPTS = 64


class _Chunks:
    """The chunks a reader mapped, found by store offset; checks every pointer it is given."""

    __slots__ = ("closed", "dir_fd", "maps", "owner", "path")

    def __init__(self, path: str, owner: int) -> None:
        self.path = path
        self.owner = owner
        self.maps: dict[int, MappedChunk] = {}
        self.closed = False
        self.dir_fd = open_dir(path, owner)

    def chunk(self, index: int) -> MappedChunk | None:
        """Chunk ``index``, mapped on first use; ``None`` if it is not visible yet."""
        mapping = self.maps.get(index)
        if mapping is None:
            mapping = map_chunk(self.dir_fd, self.path, index, self.owner)
            if mapping is not None:
                self.maps[index] = mapping
        return mapping

    def locate(self, offset: int, nbytes: int, what: str) -> tuple[MappedChunk, int] | None:
        """The chunk and word index of the ``nbytes`` at store ``offset``; ``None`` if their
        chunk is not visible yet; ``KVStoreError`` if no writer would store that pointer."""
        located = layout.locate(offset, nbytes)
        if located is None:
            raise KVStoreError(f"corrupt store {self.path!r}: {what} at offset {offset}")
        mapping = self.chunk(located[0])
        return None if mapping is None else (mapping, located[1])

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"reader of {self.path!r} is closed")

    def close(self) -> None:
        self.closed = True
        for mapping in self.maps.values():
            mapping.release()
        self.maps.clear()
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


class _Published(NamedTuple):
    n: int
    nan: int
    sum: float
    min: float
    max: float
    buckets: dict[int, int]


class _Stats:
    """One prefix of a series. Its lists are shared with the view's histogram, so a _Stats is
    only valid until the view's next read."""

    __slots__ = ("cumulative", "max", "min", "n", "nan", "reps", "sum")

    def __init__(self, published: _Published, tail: Tail, histogram: Histogram) -> None:
        numeric = published.n > published.nan
        lo, hi = (published.min, published.max) if numeric else (math.inf, -math.inf)
        self.n = published.n + tail.n
        self.nan = published.nan + tail.nan
        self.sum = published.sum + tail.sum
        self.min = min(lo, tail.min)
        self.max = max(hi, tail.max)
        self.reps = histogram.reps
        self.cumulative = histogram.cumulate()

    def percentiles(self, qs: Iterable[float]) -> list[float]:
        return percentiles(qs, self.cumulative, self.reps, self.min, self.max)


def _check_percent(q: object) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise TypeError(f"percentile must be a number in [0, 100], got {type(q).__name__}: {q!r}")
    value = float(q)
    if not 0.0 <= value <= 100.0:
        raise ValueError(f"percentile {q!r} is not in [0, 100]")
    return value


class _SeriesBlock:
    """A series block as a reader finds it: its summary words, and its segments, found through
    the segment tables with every pointer checked."""

    __slots__ = ("_block", "_chunk", "_chunks", "_name")

    def __init__(self, chunks: _Chunks, name: str, chunk: MappedChunk, block: int) -> None:
        self._chunks = chunks
        self._name = name
        self._chunk = chunk
        self._block = block

    def summary_copy(self) -> bytes:
        """A copy of the published summary's words."""
        return layout.summary_bytes(self._chunk.raw, self._block)

    def published_count(self) -> int:
        """The published count (a hint: not validated)."""
        return layout.published_count(self._chunk.words, self._block)

    def histogram_segment(self, k: int) -> tuple[MappedChunk, int] | None:
        """The chunk and first word of histogram segment ``k``; ``None`` if not there yet."""
        return self._segment_at(
            layout.histogram_segment,
            k,
            layout.histogram_segment_capacity,
            layout.ENTRY_BYTES,
            "histogram",
        )

    def value_segment(self, i: int) -> tuple[memoryview[int], int, int] | None:
        """Where value ``i`` lives: the chunk's words, the word index of value ``i`` and of the
        end of its segment; ``None`` if its segment is not allocated (or visible) yet."""
        k = bisect_right(layout.VALUE_SEGMENT_START, i) - 1
        if k >= layout.VALUE_SEGMENTS:
            return None
        located = self._segment_at(
            layout.value_segment, k, layout.value_segment_capacity, layout.VALUE_BYTES, "value"
        )
        if located is None:
            return None
        mapping, first = located
        base = first - layout.VALUE_SEGMENT_START[k]
        return mapping.words, base + i, base + layout.VALUE_SEGMENT_START[k + 1]

    def _segment_at(
        self,
        pointer_of: Callable[[memoryview[int], int, int], int],
        k: int,
        capacity: Callable[[int], int],
        entry_bytes: int,
        what: str,
    ) -> tuple[MappedChunk, int] | None:
        """The chunk and first word of segment ``k`` of a segment table; ``None`` if it is not
        allocated (or visible) yet. The writer allocates segments in order, each after the
        last, so a pointer that overlaps the previous segment is corruption."""
        words = self._chunk.words
        pointer = pointer_of(words, self._block, k)
        if not pointer:
            return None
        if k:
            previous = pointer_of(words, self._block, k - 1)
            if not previous:
                return None
            if pointer < previous + capacity(k - 1) * entry_bytes:
                raise KVStoreError(
                    f"corrupt store {self._chunks.path!r}: series {self._name!r} {what} "
                    f"segment {k} at {pointer} overlaps segment {k - 1} at {previous}"
                )
        return self._chunks.locate(
            pointer, capacity(k) * entry_bytes, f"series {self._name!r} {what} segment {k}"
        )

    def words(self, start: int, stop: int) -> list[int]:
        """The stored words of values [start, stop), up to the first one not written yet."""
        out: list[int] = []
        while start < stop:
            where = self.value_segment(start)
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


class SeriesView:
    """A live, read-only view of one series, from :meth:`KVStoreReader.series`.

    Every call reads the shared memory afresh, so values appended since are included. ``len``,
    :meth:`mean`, :meth:`min`, :meth:`max`, the percentiles and :meth:`summary` each describe
    one prefix of the series; :meth:`values` returns an exact prefix from ``start``.
    """

    __slots__ = (
        "_chunks",
        "_data",
        "_histogram",
        "_name",
        "_probe",
        "_published",
        "_published_copy",
        "_stats",
        "_tail",
    )

    def __init__(self, chunks: _Chunks, name: str, series_chunk: MappedChunk, block: int) -> None:
        self._chunks = chunks
        self._name = name
        self._data = _SeriesBlock(chunks, name, series_chunk, block)
        self._published_copy = b""
        self._published = _Published(0, 0, 0.0, math.inf, -math.inf, {})
        self._histogram = Histogram({})
        self._tail = Tail()
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
        self._chunks.check_open()
        hint = self._data.published_count() + BATCH
        return layout.decode_values(self._data.words(start, hint))

    def __repr__(self) -> str:
        return f"<SeriesView {self._name!r} of reader {self._chunks.path!r}>"

    def _read(self) -> _Stats:
        self._chunks.check_open()
        published = self._read_published()
        tail = self._read_tail(published.n)
        key = (self._published_copy, tail.n)
        if self._stats is None or self._stats[0] != key:
            self._stats = (key, _Stats(published, tail, self._histogram))
        return self._stats[1]

    def _read_published(self) -> _Published:
        """The last summary the writer committed, validated against its check word."""
        copied = self._data.summary_copy()
        if copied == self._published_copy:
            return self._published
        for _ in range(_READ_ATTEMPTS):
            published = self._validate(copied)
            if published is not None:
                break
            os.sched_yield()
            copied = self._data.summary_copy()
        else:
            published = self._recount()
        self._published_copy, self._published = copied, published
        self._histogram = Histogram(published.buckets)
        self._tail = Tail()
        return published

    def _validate(self, copied: bytes) -> _Published | None:
        summary = layout.unpack_summary(copied)
        entries = summary.entries
        if entries > layout.HISTOGRAM_SEGMENT_START[-1]:
            return None
        pieces: list[bytes] = []
        read = 0
        k = 0
        while read < entries:
            if k == layout.HISTOGRAM_SEGMENTS:
                return None
            located = self._data.histogram_segment(k)
            if located is None:
                return None
            mapping, first = located
            take = min(layout.histogram_segment_capacity(k), entries - read)
            pieces.append(bytes(mapping.raw[first * 8 : (first + 2 * take) * 8]))
            read += take
            k += 1
        if not layout.summary_is_valid(copied, layout.histogram_digest(pieces)):
            return None
        pairs = memoryview(b"".join(pieces)).cast("q").tolist()
        keys, counts = pairs[0::2], pairs[1::2]
        if not all(map(is_bucket_key, keys)) or min(counts, default=0) < 0:
            raise KVStoreError(
                f"corrupt store {self._chunks.path!r}: series {self._name!r} has a histogram "
                "entry that no writer makes"
            )
        return _Published(
            summary.n,
            summary.nan,
            summary.sum,
            summary.min,
            summary.max,
            dict(zip(keys, counts, strict=True)),
        )

    def _recount(self) -> _Published:
        """Summarise every readable value: for a summary that never validates (its writer died
        while committing it)."""
        total = Tail()
        buckets: collections.Counter[int] = collections.Counter()
        total.add(self._data.words(0, layout.VALUE_SEGMENT_START[-1]), buckets.update)
        return _Published(total.n, total.nan, total.sum, total.min, total.max, dict(buckets))

    def _read_tail(self, published: int) -> Tail:
        """Fold in the values written after the published summary that were not seen yet."""
        tail = self._tail
        start = published + tail.n
        stop = published + BATCH
        where = self._probe[1:] if self._probe is not None and self._probe[0] == start else None
        step = 64
        while start < stop:
            where = where or self._data.value_segment(start)
            if where is None:
                break
            view, first, end = where
            if not view[first]:
                break
            words = view[first : min(end, first + stop - start, first + step)].tolist()
            if 0 in words:
                words = words[: words.index(0)]
            tail.add(words, self._histogram.add)
            start += len(words)
            first += len(words)
            where = (view, first, end) if first < end else None
            step *= 4
        self._probe = None if where is None else (start, *where)
        return tail


class _KeyInfo(NamedTuple):
    kind: int
    chunk: MappedChunk
    word: int


def _key(name: str, labels: Mapping[str, str] | None) -> str:
    """The key a reader looks up: canonical when ``name`` is in the labelled form, else
    ``name`` as it is (a key as :meth:`KVStoreReader.keys` lists it)."""
    if labels is None:
        try:
            return _names.key(name)
        except ValueError:
            return name
    return _names.key(name, labels)


class KVStoreReader(Resource):
    """A read-only view of a store written by a :class:`BasicKVStore`, in any process.

    Opening a path that is not a store, a truncated store or a store of another format version
    raises :class:`KVStoreError`, and so does a store this user does not own (or ``owner``, a
    uid, when given: a store shared on purpose) or one that group or others may write. Keys
    and values the writer adds later become visible without reopening. Readers take no lock and
    never block the writer. Not thread-safe; a context manager that closes on exit.
    """

    def __init__(self, path: str | os.PathLike[str], *, owner: int | None = None) -> None:
        self.path = os.fspath(path)
        self._keys: dict[str, _KeyInfo] = {}
        self._views: dict[str, SeriesView] = {}
        self._last_record = 0
        self._chunks = _Chunks(self.path, os.geteuid() if owner is None else owner)
        try:
            self._chunk0 = self._chunks.chunk(0)
            if self._chunk0 is None:
                raise KVStoreError(
                    f"{self.path!r} is not a store: it has no {layout.CHUNK_NAME.format(0)}"
                )
        except BaseException:
            self._chunks.close()
            raise

    def keys(self) -> list[str]:
        """Every key, in creation order."""
        self._chunks.check_open()
        self._refresh()
        return list(self._keys)

    def kind(self, name: str, *, labels: Mapping[str, str] | None = None) -> str:
        """``"counter"``, ``"gauge"`` or ``"series"``; ``KeyError`` if there is no such key."""
        return layout.KIND_NAMES[self._info(_key(name, labels)).kind]

    def get(self, name: str, *, labels: Mapping[str, str] | None = None) -> float:
        """The value of counter or gauge ``name``; ``KeyError`` if there is none."""
        key = _key(name, labels)
        info = self._info(key)
        if info.kind == layout.SERIES:
            raise TypeError(f"key {key!r} is a series: read it with series({key!r})")
        return info.chunk.floats[info.word]

    def series(self, name: str, *, labels: Mapping[str, str] | None = None) -> SeriesView:
        """A live view of series ``name``; ``KeyError`` if there is none."""
        key = _key(name, labels)
        view = self._views.get(key)
        if view is not None:
            self._chunks.check_open()
            return view
        info = self._info(key)
        if info.kind != layout.SERIES:
            raise TypeError(f"key {key!r} is a {layout.KIND_NAMES[info.kind]}, not a series")
        view = self._views[key] = SeriesView(self._chunks, key, info.chunk, info.word)
        return view

    def snapshot(self) -> dict[str, float | SeriesSummary]:
        """Every key with its value (counters and gauges) or :class:`SeriesSummary`."""
        self._chunks.check_open()
        self._refresh()
        out: dict[str, float | SeriesSummary] = {}
        for name, info in self._keys.items():
            if info.kind == layout.SERIES:
                out[name] = self.series(name).summary()
            else:
                out[name] = info.chunk.floats[info.word]
        return out

    def to_prometheus(self, prefix: str = "") -> str:
        """The store in the Prometheus text format (0.0.4).

        Counters become ``<name>_total`` counters, gauges gauges, and series summaries with the
        0.5, 0.9 and 0.99 quantiles plus ``_sum`` and ``_count`` (of the non-NaN values). Keys
        that differ only by labels are samples of one family. Names are ``prefix + name`` with
        every character outside ``[a-zA-Z0-9_:]`` replaced by ``_`` (and ``_`` put before a
        leading digit); families whose names collide get a ``_2``, ``_3``... suffix.
        """
        snapshot = self.snapshot()
        kinds = {name: layout.KIND_NAMES[self._keys[name].kind] for name in snapshot}
        return render_prometheus(snapshot, kinds, prefix)

    def close(self) -> None:
        """Unmap the store; the reader and its views raise ``RuntimeError`` afterwards."""
        self._chunks.close()
        self._keys.clear()
        self._views.clear()

    def __repr__(self) -> str:
        closed = " (closed)" if self._chunks.closed else ""
        return f"<KVStoreReader {self.path!r}{closed}>"

    def _info(self, key: str) -> _KeyInfo:
        self._chunks.check_open()
        info = self._keys.get(key)
        if info is None:
            self._refresh()
            info = self._keys.get(key)
            if info is None:
                raise KeyError(f"no key {key!r} in store {self.path!r}")
        return info

    def _refresh(self) -> None:
        """Follow the chain of key records past the last one read, stopping at the first one
        not (yet) committed. The allocator hands out increasing offsets, so a ``next`` that
        does not point forward is corruption (and would loop)."""
        chunks = self._chunks
        if self._last_record:
            located = chunks.locate(self._last_record, layout.RECORD_HEAD, "key record")
            assert located is not None  # it was read from there
            offset = layout.next_record(located[0].words, located[1])
        else:
            assert self._chunk0 is not None
            offset = layout.first_key(self._chunk0.words)
        while offset:
            if offset <= self._last_record:
                raise KVStoreError(
                    f"corrupt store {self.path!r}: the key record at {self._last_record} has "
                    f"next {offset}, not after it"
                )
            located = chunks.locate(offset, layout.RECORD_HEAD, "key record")
            if located is None:
                return
            mapping, word = located
            record = layout.read_record(mapping.words, mapping.raw, word)
            if record is None:
                return
            target = chunks.locate(record.data, layout.data_bytes(record.kind), "key data")
            if target is None:
                return
            try:
                name = record.name.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise KVStoreError(f"corrupt store {self.path!r}: key name {exc}") from None
            self._keys[name] = _KeyInfo(record.kind, *target)
            self._last_record = offset
            offset = layout.next_record(mapping.words, word)
