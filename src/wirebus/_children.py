"""The launcher's children: watching them exit and reaping them without blocking the loop.

:class:`Process` holds a spawned child and a pidfd that becomes readable when it exits; its
status is read without reaping, so its pid (and process-group id) cannot be reused while the
launch is still being signalled. :func:`watching_exits`, :func:`wait_exits` and
:func:`collect_status` wait on pidfds through the event loop; :func:`until_gone` polls a
:class:`~wirebus._watchdog.Sweep`; :func:`child_subreaper` makes this process adopt the orphans
of what it stops (Linux ``prctl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

from wirebus._aio import resolve
from wirebus._watchdog import Sweep

_STATUS_WITHIN = 1.0
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37


class Process:
    """A spawned child and a pidfd that becomes readable when it exits; a child whose pidfd
    cannot be opened is killed and reaped (nobody could watch it) before the error propagates."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        try:
            self.pidfd = os.pidfd_open(popen.pid)
        except BaseException:
            popen.kill()
            popen.wait()
            raise

    def exit_status(self) -> int | None:
        """The exit code (negative: killed by that signal) without reaping, or None if running.

        The process stays a zombie, so its pid (and process group id) cannot be reused while
        its group is still being signalled.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        try:
            result = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.popen.poll()
        if result is None or result.si_pid == 0:
            return None
        if result.si_code == os.CLD_EXITED:
            return result.si_status
        return -result.si_status


_P = TypeVar("_P", bound=Process)

_subreaper_users = 0
_was_subreaper = False


@contextlib.contextmanager
def child_subreaper() -> Iterator[None]:
    """Make this process a child subreaper while the block runs (Linux ``prctl``).

    Processes orphaned meanwhile (a service's children when it exits) are re-parented to this
    process instead of init, so they stay within reach and their pids are not recycled before
    they are reaped. Nested and concurrent uses share one setting; one that was on before stays.
    """
    global _subreaper_users, _was_subreaper
    if _subreaper_users == 0:
        was = ctypes.c_int(0)
        _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.addressof(was))
        _was_subreaper = bool(was.value)
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _subreaper_users += 1
    try:
        yield
    finally:
        _subreaper_users -= 1
        if _subreaper_users == 0 and not _was_subreaper:
            _prctl(_PR_SET_CHILD_SUBREAPER, 0)


def _prctl(option: int, arg: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}, {arg}): {os.strerror(code)}")


@contextlib.contextmanager
def watching_exits(
    loop: asyncio.AbstractEventLoop,
    children: Iterable[_P],
    on_exit: Callable[[_P], None],
) -> Iterator[None]:
    """Call ``on_exit(child)`` from ``loop`` as each of ``children`` exits while the block runs
    (its pidfd becomes readable), once per child."""
    watched = set(children)

    def exited(child: _P) -> None:
        loop.remove_reader(child.pidfd)
        watched.discard(child)
        on_exit(child)

    for child in watched:
        loop.add_reader(child.pidfd, exited, child)
    try:
        yield
    finally:
        for child in watched:
            loop.remove_reader(child.pidfd)


async def wait_exits(
    loop: asyncio.AbstractEventLoop, children: Sequence[Process], deadline: float
) -> None:
    """Wait until every process in ``children`` has exited or ``deadline`` passes."""
    pending = {child for child in children if child.exit_status() is None}
    if not pending:
        return
    done: asyncio.Future[None] = loop.create_future()

    def on_exit(child: Process) -> None:
        pending.discard(child)
        if not pending:
            resolve(done)

    timer = loop.call_at(deadline, resolve, done)
    try:
        with watching_exits(loop, pending, on_exit):
            await done
    finally:
        timer.cancel()


async def until_gone(loop: asyncio.AbstractEventLoop, sweep: Sweep, deadline: float) -> None:
    """Poll until no process of ``sweep`` is left or ``deadline`` passes (new descendants can
    appear at any time, so there is no single event to wait for)."""
    delay = 0.002
    while loop.time() < deadline and sweep.alive():
        await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
        delay = min(delay * 2, 0.05)


async def collect_status(loop: asyncio.AbstractEventLoop, child: Process) -> int | None:
    """The exit status of a child whose pidfd reported its exit.

    The pidfd can fire a moment before the status is collectable, so this retries briefly.
    """
    end = loop.time() + _STATUS_WITHIN
    delay = 0.0005
    while (status := child.exit_status()) is None and loop.time() < end:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return status
