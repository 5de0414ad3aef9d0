"""Histogram buckets of float64 values, batch summaries and percentiles from bucket counts.

The bucket key of a value is the top 18 bits of its stored word: sign, 11 exponent bits and the
top 6 mantissa bits, so 64 linear buckets per power of two, each within 0.78% of its midpoint.
Zeros (stored as two reserved signalling-NaN patterns) and ±inf have buckets of their own.
"""

from __future__ import annotations

import collections
import functools
import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, islice
from typing import NamedTuple, cast

from wirebus.kvstore._layout import ZERO_NEG_BITS, ZERO_POS_BITS

BATCH = 16384  # values folded at once: the writer publishes every BATCH values

_KEY_SHIFT = 46
_KEY_LIMIT = 1 << 18
_KEY_SIGN = 1 << 17
_KEY_MAGNITUDE = _KEY_SIGN - 1
_INF_MAGNITUDE = 0x7FF0_0000_0000_0000 >> _KEY_SHIFT
_ZERO_POS_KEY = ZERO_POS_BITS >> _KEY_SHIFT
_ZERO_NEG_KEY = (ZERO_NEG_BITS & ((1 << 64) - 1)) >> _KEY_SHIFT
_LANES = int.from_bytes(b"\xff\xff\x03\x00\x00\x00\x00\x00" * BATCH, "little")
_FEW = 16  # an extreme bucket this small is searched for the exact min or max


def is_bucket_key(key: int) -> bool:
    """Whether ``key`` is a bucket a writer counts (not a NaN's, not out of range)."""
    if not 0 <= key < _KEY_LIMIT:
        return False
    return (key & _KEY_MAGNITUDE) <= _INF_MAGNITUDE or key in (_ZERO_POS_KEY, _ZERO_NEG_KEY)


@functools.cache
def representative(key: int) -> float:
    """The value reported for a bucket: within 0.78% of every normal value in it."""
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


class Batch(NamedTuple):
    """NaN count, sum, min and max of the non-NaN values of a batch, and its bucket counts."""

    nan: int
    sum: float
    min: float
    max: float
    counts: dict[int, int]


def fold(stored: bytes) -> Batch:
    """Summarise at most :data:`BATCH` stored value words."""
    if len(stored) <= 512:
        counts: dict[int, int] = {}
        for word in memoryview(stored).cast("Q").tolist():
            key = word >> _KEY_SHIFT
            counts[key] = counts.get(key, 0) + 1
        lanes = b""
    else:
        keys = (int.from_bytes(stored, "little") >> _KEY_SHIFT) & _LANES
        lanes = keys.to_bytes(len(stored), "little")
        counts = collections.Counter(memoryview(lanes).cast("q"))
    floats = cast("Sequence[float]", memoryview(stored).cast("d"))
    total = sum(floats)
    if total == total:
        if max(counts) < _KEY_SIGN:  # no negative values: keys are ordered like values
            low, high = min(counts), max(counts)
        else:
            low, high = min(counts, key=_sort_key), max(counts, key=_sort_key)
        return Batch(
            0,
            total,
            _extreme(min, floats, lanes, low, counts[low]),
            _extreme(max, floats, lanes, high, counts[high]),
            counts,
        )
    clean = [x for x in cast("list[float]", memoryview(stored).cast("d").tolist()) if x == x]
    zeros = counts.get(_ZERO_POS_KEY, 0) + counts.get(_ZERO_NEG_KEY, 0)
    nan = len(floats) - len(clean) - zeros
    for key in [key for key in counts if not is_bucket_key(key)]:
        del counts[key]
    if _ZERO_POS_KEY in counts:
        clean.append(0.0)
    if _ZERO_NEG_KEY in counts:
        clean.append(-0.0)
    if not clean:
        return Batch(nan, 0.0, math.inf, -math.inf, counts)
    return Batch(nan, sum(clean), min(clean), max(clean), counts)


def _extreme(
    pick: Callable[[Iterable[float]], float],
    floats: Sequence[float],
    lanes: bytes,
    key: int,
    count: int,
) -> float:
    """``pick`` (min or max) of ``floats``, looking only at the values in bucket ``key`` (the
    extreme one) when it holds few of them: found by their key lanes, 8 aligned bytes each."""
    if count > _FEW or not lanes:
        return pick(floats)
    pattern = key.to_bytes(8, "little")
    found: list[float] = []
    at = lanes.find(pattern)
    while at >= 0:
        if at % 8 == 0:
            found.append(floats[at >> 3])
            at = lanes.find(pattern, at + 8)
        else:
            at = lanes.find(pattern, at + 1)
    return pick(found)


class Tail:
    """Count, NaN count, sum, min and max of the values after the published summary."""

    __slots__ = ("max", "min", "n", "nan", "sum")

    def __init__(self) -> None:
        self.n = 0
        self.nan = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def add(self, words: list[int], add_buckets: Callable[[dict[int, int]], None]) -> None:
        """Fold stored ``words`` in, handing their bucket counts to ``add_buckets``."""
        for start in range(0, len(words), BATCH):
            part = words[start : start + BATCH]
            batch = fold(array("q", part).tobytes())
            self.n += len(part)
            self.nan += batch.nan
            self.sum += batch.sum
            self.min = min(self.min, batch.min)
            self.max = max(self.max, batch.max)
            add_buckets(batch.counts)


class Histogram:
    """Bucket counts kept in value order: sort keys, representatives, counts, and cumulative
    counts (brought up to date lazily from the first changed bucket)."""

    __slots__ = ("counts", "cumulative", "dirty", "reps", "sort_keys")

    def __init__(self, buckets: dict[int, int]) -> None:
        order = sorted(buckets, key=_sort_key)
        self.sort_keys = [_sort_key(key) for key in order]
        self.reps = [representative(key) for key in order]
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
                self.reps.insert(i, representative(key))
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


def percentiles(
    qs: Iterable[float], cumulative: list[int], reps: list[float], lo: float, hi: float
) -> list[float]:
    """The ``qs``-th percentiles (numpy's "lower" method) from cumulative bucket counts, each
    bucket's representative clamped to [lo, hi]; NaN when there are no values."""
    if not cumulative:
        return [math.nan for _ in qs]
    last = cumulative[-1] - 1
    return [min(max(reps[bisect_right(cumulative, int(q * last / 100.0))], lo), hi) for q in qs]
