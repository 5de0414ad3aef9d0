"""The launcher's children: spawning them, hearing them exit, ending and reaping them all.

:class:`Launch` holds the processes of one launch: each service spawned in a process group of
its own, with stdin closed, its output in a log file, and the read end of a *death pipe* whose
write end only this process holds; the watchdog (:mod:`wirebus._watchdog`), which ends the
launch when that pipe reports EOF (this process died, even by SIGKILL). It ends every process of
the launch, from the event loop or blocking, and releases what it holds.

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
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from wirebus import _paths, _watchdog
from wirebus._aio import resolve
from wirebus._watchdog import Sweep
from wirebus.errors import ServiceStartupError
from wirebus.service import DEATH_FD_ENV

_STATUS_WITHIN = 1.0
_KILL_WAIT = 5.0
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37

_log = logging.getLogger("wirebus.launcher")


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


class Service(Process):
    """A spawned service: its name, process, pidfd and log file."""

    def __init__(self, name: str, popen: subprocess.Popen[bytes], log_path: str) -> None:
        super().__init__(popen)
        self.name = name
        self.log_path = log_path


class Launch:
    """The processes of one launch: its services, the death pipe and the watchdog.

    :meth:`open` makes the log directory (a fresh temporary one when ``log_dir`` is None) and
    the death pipe; :meth:`spawn` starts each service; :meth:`watch` starts the watchdog, which
    ends the launch within ``grace`` s of this process's death and removes the directories it
    names. :meth:`end` (from the event loop) and :meth:`end_blocking` end every process of the
    launch: the services' process groups, their descendants (also those in a session of their
    own) and whatever carries the launch's marker. :meth:`release` closes what is held.
    """

    def __init__(self, log_dir: str | None, grace: float) -> None:
        self.log_dir = log_dir
        self._owns_log_dir = False
        self._grace = grace
        self.services: dict[str, Service] = {}
        self._death_read: int | None = None
        self._death_write: int | None = None
        self._watchdog: Process | None = None
        self._marker = secrets.token_hex(8)

    def open(self) -> None:
        """Make the log directory and the death pipe."""
        if self.log_dir is None:
            self.log_dir = tempfile.mkdtemp(prefix="wirebus-logs-", dir=_paths.temp_dir())
            self._owns_log_dir = True
        else:
            os.makedirs(self.log_dir, exist_ok=True)
        self._death_read, self._death_write = os.pipe()

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None,
    ) -> None:
        """Start service ``name`` in a process group of its own, stdin closed, its output in
        ``<log_dir>/<name>.log``, with this environment plus ``env``, the death pipe and the
        launch's marker; ``ServiceStartupError`` when it cannot be started."""
        assert self._death_read is not None
        assert self.log_dir is not None
        env = {
            **os.environ,
            **env,
            DEATH_FD_ENV: str(self._death_read),
            _watchdog.LAUNCH_ENV: self._marker,
        }
        log_path = os.path.join(self.log_dir, f"{name}.log")
        with open(log_path, "wb") as log:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    pass_fds=(self._death_read,),
                )
            except OSError as exc:
                raise ServiceStartupError(
                    f"cannot start service {name!r} ({list(argv)!r}): {exc}", name=name
                ) from exc
        self.services[name] = Service(name, popen, log_path)

    def watch(self, directories: Iterable[str]) -> None:
        """Start the watchdog, which ends the launch if this process dies, even by SIGKILL,
        then removes ``directories`` and a temporary log directory; then close this process's
        read end of the death pipe (each child holds its own).

        Services written with :func:`~wirebus.run_service` also watch the death pipe
        themselves; the watchdog covers every other service (and every process of the launch).
        """
        if self.services:
            directories = list(directories)
            if self._owns_log_dir and self.log_dir is not None:
                directories.insert(0, self.log_dir)
            pids = ",".join(str(service.pid) for service in self.services.values())
            popen = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-S",
                    _watchdog.__file__,
                    str(self._grace),
                    self._marker,
                    pids,
                    *directories,
                ],
                stdin=self._death_read,
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            self._watchdog = Process(popen)
        self._close_death_read()

    def _close_death_read(self) -> None:
        if self._death_read is not None:
            os.close(self._death_read)
            self._death_read = None

    async def end(self, total: float) -> None:
        """SIGTERM every process of the launch, SIGKILL what is left after ``total`` s, reap
        the children; never blocking the event loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total
        services = list(self.services.values())
        sweep = self._sweep()
        try:
            with child_subreaper():
                sweep.signal(signal.SIGTERM)
                await wait_exits(loop, services, deadline)
                await until_gone(loop, sweep, deadline)
                sweep.signal(signal.SIGKILL)
                children = self._children()
                await wait_exits(loop, children, loop.time() + _KILL_WAIT)
                for child in children:
                    await collect_status(loop, child)
                    child.popen.poll()
                await until_gone(loop, sweep, loop.time() + _KILL_WAIT)
                sweep.reap(keep=(child.pid for child in children))
        finally:
            sweep.close()

    def end_blocking(self, grace: float) -> None:
        """SIGTERM the launch, wait up to ``grace`` s, SIGKILL what is left; reap, blocking."""
        sweep = self._sweep()
        try:
            with child_subreaper():
                _watchdog.end(sweep, grace)
                children = self._children()
                for child in children:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.popen.wait(_KILL_WAIT)
                sweep.reap(keep=(child.pid for child in children))
        finally:
            sweep.close()

    def _sweep(self) -> Sweep:
        """Kill the watchdog (stopping is this process's job now); a sweep of the launch."""
        if self._watchdog is not None:
            self._watchdog.popen.kill()
        return Sweep((service.pid for service in self.services.values()), self._marker)

    def _children(self) -> list[Process]:
        children: list[Process] = list(self.services.values())
        if self._watchdog is not None:
            children.append(self._watchdog)
        return children

    def release(self) -> dict[str, int]:
        """Close the pidfds and the death pipe, remove a temporary log directory; return each
        reaped service's exit code by name (one that could not be reaped is logged)."""
        returncodes = {}
        for name, service in self.services.items():
            if service.popen.returncode is None:
                _log.error("service %r (pid %d) could not be reaped", name, service.pid)
            else:
                returncodes[name] = service.popen.returncode
        for child in self._children():
            os.close(child.pidfd)
        self._close_death_read()
        if self._death_write is not None:
            os.close(self._death_write)
            self._death_write = None
        if self._owns_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        return returncodes
