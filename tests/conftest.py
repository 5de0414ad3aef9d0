"""Shared test set-up: every test must leave no child process, thread, /dev/shm entry or fd
behind."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import zmq

from wirebus import _paths
from wirebus.transport._publisher import close_live_publishers

pytest_plugins = ["pytester"]

# Each test run gets its own runtime directory (every store, ipc socket and log directory the
# library makes goes there; child processes inherit it), so the leak check below sees only this
# run's entries, and other wirebus users on the machine, a second test run included, are no
# concern. Set at import, before any test or fixture makes anything.
RUNTIME_DIR = tempfile.mkdtemp(prefix="wirebus-test-", dir=_paths.shm_dir())
os.environ[_paths.RUNTIME_DIR_ENV] = RUNTIME_DIR


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(RUNTIME_DIR, ignore_errors=True)


def _children() -> set[int]:
    me = str(os.getpid())
    found = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # field 4 of stat: ppid
            found.add(int(pid))
    return found


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return out


def _runtime_entries() -> set[str]:
    """What wirebus made in this run's own runtime directory (stores, ipc dirs, logs)."""
    return set(os.listdir(RUNTIME_DIR))


@pytest.fixture(scope="session", autouse=True)
def _global_zmq_context() -> None:
    # libzmq starts the shared context's threads (and their fds) with its first socket: do it
    # once up front so they are not counted as a test's leak.
    zmq.Context.instance().socket(zmq.PUB).close(linger=0)


@pytest.fixture(autouse=True)
def _no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    children, fds, shm, threads = (
        _children(),
        _fds(),
        _runtime_entries(),
        set(threading.enumerate()),
    )
    yield
    gc.collect()
    leaked_threads = [t.name for t in threading.enumerate() if t not in threads]
    if leaked_threads:  # stop leaked publishers' writers, so the next test does not fail too
        close_live_publishers()
    assert not leaked_threads, f"{request.node.nodeid} left threads {leaked_threads}"
    leaked_children = _children() - children
    assert not leaked_children, f"{request.node.nodeid} left child processes {leaked_children}"
    leaked_shm = _runtime_entries() - shm
    assert not leaked_shm, f"{request.node.nodeid} left runtime-dir entries {leaked_shm}"
    leaked_fds = _settled(lambda: {fd: t for fd, t in _fds().items() if fds.get(fd) != t})
    assert not leaked_fds, f"{request.node.nodeid} left file descriptors {leaked_fds}"


def _settled(leftovers: Callable[[], dict[str, str]], timeout: float = 2.0) -> dict[str, str]:
    """Poll ``leftovers`` until empty or ``timeout``: libzmq's reaper thread closes a socket's
    fds a moment after ``close()`` returns."""
    deadline = time.monotonic() + timeout
    found = leftovers()
    while found and time.monotonic() < deadline:
        time.sleep(0.01)
        found = leftovers()
    return found
