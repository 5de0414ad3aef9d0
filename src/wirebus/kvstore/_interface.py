"""The public types of a store: the interface a metrics backend implements (a store of named
counters, gauges and series), the handle types, and the summary a reader gives of a series."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

import msgspec

from wirebus._resource import Resource


class _Value(ABC):
    """A single float64 value: what counters and gauges have in common."""

    __slots__ = ()

    @abstractmethod
    def set(self, value: float) -> None:
        """Replace the value (e.g. to restore a total); NaN and ±inf are stored as they are."""

    @property
    @abstractmethod
    def value(self) -> float:
        """The current value."""


class Counter(_Value):
    """A monotonically increasing float64 value: a count, a total of bytes or seconds."""

    __slots__ = ()

    @abstractmethod
    def inc(self, n: float = 1.0) -> None:
        """Add ``n`` (a non-negative real number, ``inf`` allowed) to the counter."""


class Gauge(_Value):
    """A float64 value that goes up and down: a queue depth, a rate, a temperature."""

    __slots__ = ()


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

    A key is a name, optionally with labels: ``labels={"model": "a"}`` or the Prometheus form
    ``'name{model="a"}'`` name the same key. Asking twice for the same key returns the same
    handle; asking for an existing key as another kind raises ``TypeError``. A store is a
    context manager that closes on exit.
    """

    @abstractmethod
    def counter(self, name: str, *, labels: Mapping[str, str] | None = None) -> Counter:
        """Return the counter ``name``, creating it (at 0.0) on first use."""

    @abstractmethod
    def gauge(self, name: str, *, labels: Mapping[str, str] | None = None) -> Gauge:
        """Return the gauge ``name``, creating it (at 0.0) on first use."""

    @abstractmethod
    def series(self, name: str, *, labels: Mapping[str, str] | None = None) -> Series:
        """Return the series ``name``, creating it (empty) on first use."""

    @abstractmethod
    def close(self) -> None:
        """Release the store; handles used afterwards raise ``RuntimeError``. Idempotent."""


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
