"""A lock-free shared-memory metrics store: one writer process, any number of reader processes.

:class:`BasicKVStore` (the writer) keeps counters, gauges and series of float64 in fixed-size
chunk files in a private directory (under ``/dev/shm`` by default). :class:`KVStoreReader` maps
the same files read-only in any process and never blocks the writer. Every value a reader returns
is one the writer stored, on x86 and on ARM: single values are aligned 8-byte words written with
one store, and everything that spans several words (key records, series summaries and
histograms) carries a check word that readers verify, retrying when a store is not yet visible.
A store path is trusted only if this user owns it and nobody else may write to it.
:class:`MetricsServer` serves a store to Prometheus. The format and the protocol are described in
``docs/kvstore.md``.

Inside: ``_layout`` (the only module that knows an offset), ``_files`` (trusted paths, chunk
files, clean-up), ``_histogram`` (buckets and percentiles), ``_names`` (keys and labels),
``_writer``, ``_reader``, ``_export`` (Prometheus text) and ``_serve`` (its HTTP endpoint).
"""

from wirebus.kvstore._files import cleanup_stale as cleanup_stale
from wirebus.kvstore._files import remove_store as remove_store
from wirebus.kvstore._interface import Counter as Counter
from wirebus.kvstore._interface import Gauge as Gauge
from wirebus.kvstore._interface import KVStore as KVStore
from wirebus.kvstore._interface import Series as Series
from wirebus.kvstore._interface import SeriesSummary as SeriesSummary
from wirebus.kvstore._reader import KVStoreReader as KVStoreReader
from wirebus.kvstore._reader import SeriesView as SeriesView
from wirebus.kvstore._serve import MetricsServer as MetricsServer
from wirebus.kvstore._writer import BasicKVStore as BasicKVStore

__all__ = [
    "BasicKVStore",
    "Counter",
    "Gauge",
    "KVStore",
    "KVStoreReader",
    "MetricsServer",
    "Series",
    "SeriesSummary",
    "SeriesView",
    "cleanup_stale",
    "remove_store",
]
