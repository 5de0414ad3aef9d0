"""Garbage in a store's files: every reader call returns values or raises KVStoreError, soon.

A valid store (counters, a gauge, a series of several segments with a published summary and
histogram, an unpublished series, enough empty series blocks to need a second chunk, and key
records in both chunks) gets random bytes written at random offsets, mostly in the part its
writer used. A reader that opens the store after the damage calls everything: ``keys``,
``get``, every ``SeriesView`` method, ``snapshot`` and ``to_prometheus``; one that had opened
and read it before asks its usual questions again. Each call must return or raise
``KVStoreError`` within one second of CPU time (``cpu_deadline``: a loop burns CPU time, a busy
machine does not inflate it). The bytes are put back after each example, so one store serves
them all. ``WIREBUS_FUZZ_EXAMPLES`` sets the number of examples (CI: 800, about 25 s).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_kvstore_hostile import cpu_deadline
from wirebus import _paths
from wirebus.errors import KVStoreError
from wirebus.kvstore import BasicKVStore, KVStoreReader

T = TypeVar("T")
CHUNK_SIZE = 1 << 20
EXAMPLES = int(os.environ.get("WIREBUS_FUZZ_EXAMPLES", "800"))
EMPTY_SERIES = 100  # 9,280-byte blocks: enough for a second chunk


class Template:
    """A closed store and the bytes of its chunks as the writer left them."""

    def __init__(self, path: Path) -> None:
        store = BasicKVStore(path)
        store.counter("requests").inc(41)
        store.gauge("depth").set(-2.5)
        store.series("latency").extend(float(i % 977) + 0.5 for i in range(20_000))
        for i in range(EMPTY_SERIES):
            store.series(f"empty{i}")
        store.series("tail").extend([1.0, math.nan, -0.0, math.inf, 3.0])
        store.counter("late").inc()
        store.close()
        self.path = path
        self.chunks = sorted(p for p in path.iterdir() if p.name.startswith("chunk-"))
        self.data = [p.read_bytes() for p in self.chunks]
        self.used = [len(d.rstrip(b"\0")) for d in self.data]

    def damage(self, writes: list[tuple[int, int, bytes]]) -> None:
        for chunk, offset, data in writes:
            with open(self.chunks[chunk], "r+b") as f:
                f.seek(offset)
                f.write(data)

    def repair(self, writes: list[tuple[int, int, bytes]]) -> None:
        self.damage([(c, o, self.data[c][o : o + len(d)]) for c, o, d in writes])


@pytest.fixture(scope="module")
def template() -> Iterator[Template]:
    base = Path(tempfile.mkdtemp(prefix="wirebus-kvfuzz-", dir=_paths.shm_dir()))
    try:
        yield Template(base / "store")
    finally:
        shutil.rmtree(base)


def bounded(call: Callable[[], T]) -> T | None:
    """``call()``, or None if it raised KVStoreError; anything else fails the example."""
    with cpu_deadline(1.0):
        try:
            return call()
        except KVStoreError:
            return None


def read_everything(reader: KVStoreReader) -> None:
    """Every call on a few keys at both ends of the chain, then the calls that read them all."""
    names = bounded(reader.keys) or []
    for name in names[:5] + names[-3:]:
        try:
            bounded(lambda: reader.get(name))  # noqa: B023 (called at once)
            continue
        except TypeError:  # a series
            pass
        view = bounded(lambda: reader.series(name))  # noqa: B023
        if view is None:
            continue
        for call in (
            lambda: len(view),  # noqa: B023
            view.values,
            lambda: view.values(19_000),  # noqa: B023
            view.mean,
            view.min,
            view.max,
            lambda: view.percentile(50),  # noqa: B023
            lambda: view.percentiles([0, 99.9, 100]),  # noqa: B023
            view.summary,
        ):
            bounded(call)
    bounded(reader.to_prometheus)  # snapshot() of every key, and the export


def read_cached(reader: KVStoreReader) -> None:
    """What a long-lived reader asks again and again: keys, the big series, the last key."""
    names = bounded(reader.keys) or []
    view = bounded(lambda: reader.series("latency"))
    if view is not None:
        bounded(view.summary)
        bounded(lambda: view.values(19_000))
    if names and names[-1] == "late":
        bounded(lambda: reader.get("late"))


def open_reader(path: Path) -> KVStoreReader | None:
    return bounded(lambda: KVStoreReader(path))


word = st.one_of(
    st.binary(min_size=1, max_size=16),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: n.to_bytes(8, "little", signed=True)),
    st.integers(-64, CHUNK_SIZE * 3).map(lambda n: n.to_bytes(8, "little", signed=True)),
)


@st.composite
def damage(draw: st.DrawFn, used: list[int]) -> list[tuple[int, int, bytes]]:
    writes = []
    for _ in range(draw(st.integers(1, 6))):
        chunk = draw(st.integers(0, len(used) - 1))
        end = draw(st.sampled_from([used[chunk], used[chunk], 4096, CHUNK_SIZE]))
        data = draw(word)
        offset = draw(st.integers(0, end - len(data)))
        if draw(st.booleans()):
            offset &= ~7  # aligned words hit the structures squarely
        writes.append((chunk, offset, data))
    return writes


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_random_bytes_anywhere_give_values_or_kvstore_error(
    template: Template, data: st.DataObject
) -> None:
    writes = data.draw(damage(template.used))
    before = open_reader(template.path)
    assert before is not None
    try:
        read_cached(before)
        template.damage(writes)
        read_cached(before)
        after = open_reader(template.path)
        if after is not None:
            with after:
                read_everything(after)
    finally:
        before.close()
        template.repair(writes)


def test_the_template_is_valid(template: Template) -> None:
    assert len(template.chunks) == 2
    with KVStoreReader(template.path) as reader:
        names = reader.keys()
        assert names[:3] + names[-2:] == ["requests", "depth", "latency", "tail", "late"]
        assert len(names) == 5 + EMPTY_SERIES
        assert len(reader.series("latency")) == 20_000
        assert os.path.getsize(template.chunks[1]) == CHUNK_SIZE
