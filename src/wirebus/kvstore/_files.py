"""The store's files on a shared file system: trusted, never followed, never blocking.

/dev/shm is writable by every local user (PITFALLS 32). A store directory is trusted only if
this user (or the owner a reader names) owns it and nobody else may write to it; it is opened
with ``O_NOFOLLOW`` and every file in it relative to that directory's descriptor, with
``O_NOFOLLOW | O_NONBLOCK`` and a check that it is a regular file with the same trust. Chunks
are created whole (reserved, headed, mapped) under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import re
import stat

from wirebus import _paths
from wirebus.errors import KVStoreError
from wirebus.kvstore._layout import (
    CHUNK_NAME,
    CHUNK_SIZE,
    HEADER_BYTES,
    LOCK_NAME,
    check_header,
    header_pid,
    is_store_start,
    pack_header,
)

_STORE_FILE = re.compile(rf"\.?chunk-\d{{6}}(\.tmp)?|{LOCK_NAME}")


class MappedChunk:
    """One mapped chunk file with its views: ``raw`` bytes, int64 ``words``, float64
    ``floats``."""

    __slots__ = ("floats", "mm", "raw", "words")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.raw = memoryview(mm)
        self.floats = self.raw.cast("d")
        self.words = self.raw.cast("q")

    def release(self) -> None:
        """Release the views, then the mapping (handles using them then raise ValueError)."""
        self.floats.release()
        self.words.release()
        self.raw.release()
        self.mm.close()


def check_mode(mode: object) -> int:
    """``mode`` for store files: owner read-write, group/other at most read."""
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"mode must be an int, got {type(mode).__name__}: {mode!r}")
    if mode & ~0o777 or mode & 0o600 != 0o600 or mode & 0o022:
        raise ValueError(
            f"mode {mode:#o} is not allowed: files must be readable and writable by their owner "
            "and writable by no one else"
        )
    return mode


def directory_mode(mode: int) -> int:
    """The store directory's mode for files of ``mode``: searchable where they are readable."""
    return 0o700 | (0o050 if mode & 0o040 else 0) | (0o005 if mode & 0o004 else 0)


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


def open_dir(path: str, owner: int) -> int:
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


def open_file(dir_fd: int, dir_path: str, name: str, flags: int, owner: int) -> int:
    """Open the store file ``name``: never through a symlink, never blocking on a FIFO, and only
    a regular file ``owner`` owns and nobody else may write. ``FileNotFoundError`` passes."""
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


def create_lock(dir_fd: int, mode: int) -> int:
    """Create the store's lock file; ``FileExistsError`` if it exists."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(LOCK_NAME, flags, mode, dir_fd=dir_fd)
    os.fchmod(fd, mode)
    return fd


def remove(name: str, dir_fd: int) -> None:
    """Remove file ``name`` of the directory; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _reserve(fd: int, size: int) -> None:
    """Back every page of the file now, so a full file system fails here and not with SIGBUS."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        fallocate(fd, 0, size)
        return
    block = bytes(1 << 16)
    for offset in range(0, size, len(block)):
        os.pwrite(fd, block[: size - offset], offset)


def create_chunk(dir_fd: int, dir_path: str, index: int, mode: int) -> MappedChunk:
    """Make chunk ``index`` whole under a temporary name (reserved, headed, mapped), then
    rename it into place; on failure remove what was made and raise ``KVStoreError``."""
    final = CHUNK_NAME.format(index)
    temp = f".{final}.tmp"
    try:
        fd = os.open(
            temp,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            mode,
            dir_fd=dir_fd,
        )
    except OSError as exc:
        raise KVStoreError(
            f"cannot create chunk file {os.path.join(dir_path, temp)!r}: {exc}"
        ) from exc
    mm: mmap.mmap | None = None
    try:
        os.fchmod(fd, mode)
        _reserve(fd, CHUNK_SIZE)
        os.pwrite(fd, pack_header(index, os.getpid()), 0)
        mm = mmap.mmap(fd, CHUNK_SIZE)
        os.rename(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError as exc:
        if mm is not None:
            mm.close()
        remove(temp, dir_fd)
        raise KVStoreError(
            f"cannot add chunk {os.path.join(dir_path, final)!r} ({CHUNK_SIZE} bytes) "
            f"to the store: {exc}"
        ) from exc
    finally:
        os.close(fd)
    return MappedChunk(mm)


def map_chunk(dir_fd: int, dir_path: str, index: int, owner: int) -> MappedChunk | None:
    """Map chunk ``index`` read-only after checking its header; ``None`` if it does not exist
    (yet). Anything else wrong is a ``KVStoreError``."""
    name = CHUNK_NAME.format(index)
    path = os.path.join(dir_path, name)
    try:
        fd = open_file(dir_fd, dir_path, name, os.O_RDONLY, owner)
    except FileNotFoundError:
        return None
    try:
        check_header(os.pread(fd, HEADER_BYTES, 0), index, path, os.fstat(fd).st_size)
        return MappedChunk(mmap.mmap(fd, CHUNK_SIZE, access=mmap.ACCESS_READ))
    except OSError as exc:
        raise KVStoreError(f"cannot map {path!r}: {exc}") from exc
    finally:
        os.close(fd)


def writer_pid(dir_fd: int, dir_path: str) -> str:
    """`` (pid N)``: the writer named in chunk 0's header, or "" if it cannot be read."""
    try:
        fd = open_file(dir_fd, dir_path, CHUNK_NAME.format(0), os.O_RDONLY, os.geteuid())
    except (OSError, KVStoreError):
        return ""
    try:
        pid = header_pid(os.pread(fd, HEADER_BYTES, 0))
    finally:
        os.close(fd)
    return "" if pid is None else f" (pid {pid})"


def remove_store(path: str | os.PathLike[str]) -> None:
    """Remove the store at ``path``, whose writer is gone: its files, then the directory if
    that left it empty.

    The writer's trust rules apply: ``KVStoreError`` if ``path`` is a symlink, is not owned by
    this user, may be written by group or others, is not a wirebus store, or its writer still
    holds the lock (the error names its pid). Nothing is removed then.
    """
    path = os.fspath(path)
    owner = os.geteuid()
    dir_fd = open_dir(path, owner)
    lock_fd = -1
    try:
        try:
            chunk = open_file(dir_fd, path, CHUNK_NAME.format(0), os.O_RDONLY, owner)
        except FileNotFoundError:
            raise KVStoreError(
                f"{path!r} is not a store: it has no {CHUNK_NAME.format(0)}"
            ) from None
        try:
            magic = os.pread(chunk, 8, 0)
        finally:
            os.close(chunk)
        if not is_store_start(magic):
            raise KVStoreError(f"{path!r} is not a wirebus store (magic {magic!r})")
        with contextlib.suppress(FileNotFoundError):
            lock_fd = open_file(dir_fd, path, LOCK_NAME, os.O_RDWR, owner)
        if lock_fd >= 0:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KVStoreError(
                    f"store {path!r} still has a writer{writer_pid(dir_fd, path)}"
                ) from None
        for entry in os.listdir(dir_fd):
            if _STORE_FILE.fullmatch(entry):
                remove(entry, dir_fd)
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        os.close(dir_fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def cleanup_stale(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the stores in ``directory`` whose writer is gone, and return their paths.

    Each subdirectory holding a wirebus store is checked (``directory`` defaults to where
    :class:`BasicKVStore` makes stores: ``/dev/shm`` or the temp dir). A store is stale when its
    writer no longer holds the lock: it died, or it closed without unlinking. Only the store's
    own files are removed, then the directory if that left it empty. Anything that
    :func:`remove_store` refuses (another user's directory, one others may write, a symlink, a
    FIFO, a live store) is left alone.
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
