"""wirebus.kvstore on a /dev/shm shared with other users, and on stores holding garbage.

Another local user can pre-create a store directory, plant symlinks and FIFOs, or write any
bytes into a store it can write to (PITFALLS 32, 33). The writer, the reader and the clean-up
trust a path only when this user owns it and nobody else can write to it, never follow a
symlink, never block on a FIFO, and turn every corruption into a ``KVStoreError`` in bounded
time. Calls that would hang on the old code run in a child process with a deadline, or under a
CPU-time guard (``cpu_deadline``), so a regression fails the test instead of stalling it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

import wirebus.kvstore as kvstore
from wirebus import _paths
from wirebus.errors import KVStoreError
from wirebus.kvstore import BasicKVStore, KVStoreReader, cleanup_stale

NOBODY = 65534
CHUNK_SIZE = 1 << 20  # docs/kvstore.md: the chunk size of format version 1
RECORD_HEAD = 32  # docs/kvstore.md: a key record's words before its name
SEGMENT_TABLE = 64  # docs/kvstore.md: offset of the value segment table in a series block

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making another user's files needs root")


class Hung(Exception):
    """A call used more CPU time than ``cpu_deadline`` allows: it loops."""


@contextlib.contextmanager
def cpu_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hung` in the block once it has used ``seconds`` of CPU time.

    CPU time, not wall time: a loop burns it, a busy machine does not inflate it.
    """

    def expire(signum: int, frame: FrameType | None) -> None:
        raise Hung(f"still running after {seconds} s of CPU time")

    previous = signal.signal(signal.SIGPROF, expire)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory in the runtime dir to put stores in; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="wirebus-kvhostile-", dir=_paths.shm_dir()))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def closed_store(path: Path, **values: float) -> Path:
    """A store at ``path`` holding the counters ``values``, its writer closed."""
    store = BasicKVStore(path)
    for name, value in values.items():
        store.counter(name).set(value)
    store.close()
    return path


def chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    for name in os.listdir(path):
        os.chown(path / name, uid, uid)


def record_offset(chunk: bytes, name: str) -> int:
    """Where the key record of ``name`` starts in chunk 0 (its name follows the head)."""
    at = chunk.find(name.encode() + b"\0")
    assert at > RECORD_HEAD, name
    return at - RECORD_HEAD


def patch_word(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<q", value))


def read_in_child(path: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Open ``path`` with a reader and list its keys in another process, with a deadline."""
    code = (
        "import sys\n"
        "from wirebus.kvstore import KVStoreReader\n"
        "from wirebus.errors import KVStoreError\n"
        "try:\n"
        "    with KVStoreReader(sys.argv[1]) as r: print(r.keys())\n"
        "except KVStoreError as exc:\n"
        "    print(f'KVStoreError: {exc}')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=timeout
    )


def kv_show(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wirebus.cli", "kv", "show", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr


# ---------------------------------------------------------------------------------------------
# 1. Hijack: directories of other users, writable by others, symlinks


@needs_root
def test_the_writer_refuses_a_directory_another_user_made(shm_dir: Path) -> None:
    planted = shm_dir / "store"
    planted.mkdir(mode=0o700)
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(KVStoreError, match=f"owned by uid {NOBODY}"):
        BasicKVStore(planted)
    assert os.listdir(planted) == []


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_the_writer_refuses_a_directory_others_can_write(shm_dir: Path, mode: int) -> None:
    planted = shm_dir / "store"
    planted.mkdir()
    planted.chmod(mode)
    with pytest.raises(KVStoreError, match=f"{mode:#o}.*writable by group or others"):
        BasicKVStore(planted)
    assert os.listdir(planted) == []


def test_the_writer_never_follows_a_symlink(shm_dir: Path) -> None:
    elsewhere = shm_dir / "attacker"
    elsewhere.mkdir(mode=0o700)
    (shm_dir / "store").symlink_to(elsewhere)
    with pytest.raises(KVStoreError, match="symlink"):
        BasicKVStore(shm_dir / "store")
    assert os.listdir(elsewhere) == []


@needs_root
def test_a_reader_refuses_a_store_another_user_could_have_rewritten(shm_dir: Path) -> None:
    """The probe that found the hijack: the other user's chunk said ``requests = 999999``."""
    store = closed_store(shm_dir / "store", requests=1.0)
    chown_tree(store, NOBODY)
    with pytest.raises(KVStoreError, match=f"owned by uid {NOBODY}"):
        KVStoreReader(store)
    with KVStoreReader(store, owner=NOBODY) as reader:  # trusting that user is a choice
        assert reader.get("requests") == 1.0
    chown_tree(store, os.geteuid())
    store.chmod(0o777)
    with pytest.raises(KVStoreError, match=r"0o777.*writable by group or others"):
        KVStoreReader(store)
    store.chmod(0o700)
    (store / "chunk-000000").chmod(0o622)
    with pytest.raises(KVStoreError, match=r"0o622.*writable by group or others"):
        KVStoreReader(store)


def test_a_reader_never_follows_a_symlink(shm_dir: Path) -> None:
    real = closed_store(shm_dir / "real", requests=1.0)
    (shm_dir / "link").symlink_to(real)
    with pytest.raises(KVStoreError, match="symlink"):
        KVStoreReader(shm_dir / "link")
    victim = shm_dir / "victim"
    victim.mkdir(mode=0o700)
    (victim / "chunk-000000").symlink_to(real / "chunk-000000")
    with pytest.raises(KVStoreError, match="symlink"):
        KVStoreReader(victim)


@needs_root
def test_cleanup_stale_leaves_what_it_cannot_trust(shm_dir: Path) -> None:
    foreign = closed_store(shm_dir / "foreign")
    chown_tree(foreign, NOBODY)
    shared = closed_store(shm_dir / "shared")
    shared.chmod(0o777)
    target = closed_store(shm_dir / "target")
    linked = shm_dir / "linked"
    linked.mkdir(mode=0o700)
    for name in os.listdir(target):
        (linked / name).symlink_to(target / name)
    mine = closed_store(shm_dir / "mine")
    assert cleanup_stale(shm_dir) == [str(mine), str(target)]
    assert sorted(os.listdir(shm_dir)) == ["foreign", "linked", "shared"]
    assert sorted(os.listdir(foreign)) == ["chunk-000000", "lock"]
    assert sorted(os.listdir(shared)) == ["chunk-000000", "lock"]
    assert sorted(os.listdir(linked)) == ["chunk-000000", "lock"]


# ---------------------------------------------------------------------------------------------
# 2. FIFOs never block anyone


def test_a_fifo_for_a_chunk_blocks_no_reader_cleanup_or_cli(shm_dir: Path) -> None:
    trap = shm_dir / "trap"
    trap.mkdir(mode=0o700)
    os.mkfifo(trap / "chunk-000000", 0o600)
    result = read_in_child(trap)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("KVStoreError:")
    assert "not a regular file" in result.stdout
    code = (
        "import sys; from wirebus.kvstore import cleanup_stale; print(cleanup_stale(sys.argv[1]))"
    )
    cleaned = subprocess.run(
        [sys.executable, "-c", code, str(shm_dir)], capture_output=True, text=True, timeout=20
    )
    assert (cleaned.returncode, cleaned.stdout) == (0, "[]\n"), cleaned.stderr
    assert_one_line_error(kv_show(str(trap)), "not a regular file")
    assert os.listdir(trap) == ["chunk-000000"]


# ---------------------------------------------------------------------------------------------
# 3. A next-pointer cycle


@pytest.mark.parametrize("back_to", ["alpha", "gamma"])
def test_a_key_record_pointing_back_is_corruption_not_a_loop(shm_dir: Path, back_to: str) -> None:
    store = closed_store(shm_dir / "store", alpha=1.0, beta=2.0, gamma=3.0)
    chunk = store / "chunk-000000"
    data = chunk.read_bytes()
    patch_word(chunk, record_offset(data, "gamma") + 8, record_offset(data, back_to))
    with cpu_deadline(5), KVStoreReader(store) as reader, pytest.raises(KVStoreError, match="next"):
        reader.keys()
    assert_one_line_error(kv_show(str(store)), "next")


# ---------------------------------------------------------------------------------------------
# 4. Every corruption is a KVStoreError


def test_a_chunk_size_not_a_multiple_of_8_is_a_kvstore_error(shm_dir: Path) -> None:
    store = closed_store(shm_dir / "store", requests=1.0)
    chunk = store / "chunk-000000"
    size = CHUNK_SIZE - 4
    patch_word(chunk, 16, size)
    os.truncate(chunk, size)
    with pytest.raises(KVStoreError, match=f"chunk size {size}"):
        KVStoreReader(store)
    assert_one_line_error(kv_show(str(store)), f"chunk size {size}")


def test_a_segment_pointer_off_the_chunk_is_a_kvstore_error(shm_dir: Path) -> None:
    writer = BasicKVStore(shm_dir / "store")
    writer.series("lat").extend([1.0, 2.0, 3.0])
    writer.close()
    chunk = shm_dir / "store" / "chunk-000000"
    data = chunk.read_bytes()
    block = struct.unpack_from("<q", data, record_offset(data, "lat") + 24)[0]
    patch_word(chunk, CHUNK_SIZE - 8, 7)
    patch_word(chunk, block + SEGMENT_TABLE, CHUNK_SIZE - 8)
    with KVStoreReader(shm_dir / "store") as reader:
        view = reader.series("lat")
        for call in (view.values, view.summary, lambda: len(view), reader.snapshot):
            with pytest.raises(KVStoreError, match="segment"):
                call()
    assert_one_line_error(kv_show(str(shm_dir / "store")), "segment")


# ---------------------------------------------------------------------------------------------
# 5. async with unlinks like with


async def test_async_with_unlinks_the_directory_it_made_like_with() -> None:
    async with BasicKVStore() as store:
        store.counter("c").inc()
        parent, name = os.path.split(store.path)
    assert name not in os.listdir(parent)


async def test_async_with_on_a_given_directory_only_closes(shm_dir: Path) -> None:
    async with BasicKVStore(shm_dir) as store:
        store.counter("c").inc()
    assert sorted(os.listdir(shm_dir)) == ["chunk-000000", "lock"]
    store.unlink()


# ---------------------------------------------------------------------------------------------
# 6. Removing one named store


def test_remove_store_removes_a_stale_store_and_only_its_files(shm_dir: Path) -> None:
    gone = closed_store(shm_dir / "gone", requests=1.0)
    kvstore.remove_store(gone)
    assert os.listdir(shm_dir) == []
    kept = closed_store(shm_dir / "kept")
    (kept / "notes.txt").write_text("mine")
    kvstore.remove_store(kept)
    assert os.listdir(kept) == ["notes.txt"]


@needs_root
def test_remove_store_refuses_a_live_store_and_untrusted_paths(shm_dir: Path) -> None:
    with BasicKVStore(shm_dir / "live") as live:
        with pytest.raises(KVStoreError, match=f"writer.*pid {os.getpid()}"):
            kvstore.remove_store(live.path)
        assert sorted(os.listdir(live.path)) == ["chunk-000000", "lock"]
    foreign = closed_store(shm_dir / "foreign")
    chown_tree(foreign, NOBODY)
    with pytest.raises(KVStoreError, match=f"owned by uid {NOBODY}"):
        kvstore.remove_store(foreign)
    target = closed_store(shm_dir / "target")
    (shm_dir / "link").symlink_to(target)
    with pytest.raises(KVStoreError, match="symlink"):
        kvstore.remove_store(shm_dir / "link")
    (shm_dir / "plain").mkdir(mode=0o700)
    (shm_dir / "plain" / "chunk-000000").write_bytes(b"not a store")
    with pytest.raises(KVStoreError, match="not a wirebus store"):
        kvstore.remove_store(shm_dir / "plain")
    assert sorted(os.listdir(shm_dir)) == ["foreign", "link", "plain", "target"]
    assert sorted(os.listdir(target)) == ["chunk-000000", "lock"]
    assert sorted(os.listdir(foreign)) == ["chunk-000000", "lock"]
