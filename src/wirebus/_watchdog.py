"""Finding and ending every process of a launch; run by path, the launcher's watchdog.

A launch's processes are its services' process groups, their descendants, and every process
whose environment carries the launch's marker (``WIREBUS_LAUNCH=<id>``, inherited by whatever a
service starts, even in a new session and after its parent died). :func:`members` finds them
in ``/proc``; :class:`Sweep` ends them: SIGTERM, a grace period, SIGKILL, holding a pidfd per
process so that a recycled pid is never signalled.

Run as ``python -I -S _watchdog.py GRACE MARKER PIDS [DIRECTORY ...]`` with the launcher's death
pipe as stdin, it waits for EOF (the launcher is gone, even by SIGKILL), then ends the launch
whose services are the comma-separated ``PIDS`` and removes the ``DIRECTORY`` s (the launcher's
log and ready-socket directories). This module imports nothing but the standard library, so
the watchdog starts in a few milliseconds and keeps working whatever happens to the package.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Iterable, Sequence

LAUNCH_ENV = "WIREBUS_LAUNCH"
"""Environment variable that marks every process of one launch (the launcher sets it)."""

_POLL_FIRST = 0.002
_POLL_MOST = 0.05


def _process_table() -> dict[int, tuple[int, int]]:
    """``{pid: (ppid, pgid)}`` of every process that is not a zombie."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X"):
            table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def _has_marker(pid: int, marker: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def members(roots: Iterable[int], marker: str | None) -> set[int]:
    """The live processes of the launch whose services are ``roots`` and whose marker is
    ``marker`` (the value of :data:`LAUNCH_ENV`; None: only the roots' own): the roots'
    process groups, the roots' and every marked process's descendants. Never this process."""
    table = _process_table()
    roots = set(roots)
    found = {pid for pid, (_, pgid) in table.items() if pid in roots or pgid in roots}
    if marker:
        tag = f"{LAUNCH_ENV}={marker}".encode()
        found |= {pid for pid in table if _has_marker(pid, tag)}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    frontier = list(found | roots)
    while frontier:
        for child in children.get(frontier.pop(), ()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    found.discard(os.getpid())
    return found


class Sweep:
    """Ends the processes of one launch: :meth:`signal` them, :meth:`alive` tells who is left.

    Every process found is held by a pidfd until :meth:`close`, so a signal never reaches a
    process that merely reused its pid; one found later (forked meanwhile) gets the last signal
    sent at once. Processes that turn out to be this process's children (it is a child
    subreaper while stopping) are reaped by :meth:`reap`.
    """

    def __init__(self, roots: Iterable[int], marker: str | None) -> None:
        self._roots = tuple(roots)
        self._marker = marker
        self._fds: dict[int, int] = {}
        self._sent: signal.Signals | None = None

    def _find(self) -> None:
        for pid in members(self._roots, self._marker) - self._fds.keys():
            try:
                fd = self._fds[pid] = os.pidfd_open(pid)
            except OSError:
                continue
            if self._sent is not None:
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(fd, self._sent)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every process of the launch that is still alive (and to any found
        later)."""
        self._find()
        self._sent = sig
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, sig)

    def alive(self) -> list[int]:
        """The pids of the launch still running (looking for new ones too)."""
        self._find()
        fds = list(self._fds.values())
        exited = set(select.select(fds, [], [], 0)[0]) if fds else set()
        return [pid for pid, fd in self._fds.items() if fd not in exited]

    def reap(self, keep: Iterable[int]) -> None:
        """Collect the exit status of every exited process found that is a child of this one
        (adopted as a subreaper), except ``keep``."""
        for pid, fd in self._fds.items():
            if pid not in keep:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def end(sweep: Sweep, grace: float) -> None:
    """SIGTERM every process of ``sweep``, wait up to ``grace`` seconds, SIGKILL the rest."""
    sweep.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    delay = _POLL_FIRST
    while sweep.alive() and time.monotonic() < deadline:
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, _POLL_MOST)
    sweep.signal(signal.SIGKILL)


def main(argv: Sequence[str]) -> None:
    import shutil  # only the watchdog needs it, not every service that imports this module

    grace, marker, pids, *directories = argv
    while os.read(0, 512):
        pass
    sweep = Sweep([int(pid) for pid in pids.split(",") if pid], marker)
    try:
        end(sweep, float(grace))
    finally:
        sweep.close()
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
