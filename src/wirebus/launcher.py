"""Launcher: start helper services as subprocesses, know when they are ready, leave none behind.

:class:`ServiceLauncher` spawns each :class:`ServiceSpec` in its own process group with stdin
closed and its output in a log file, then waits on the ready signals and on the children's exits
together (pidfds), against one deadline. A child that dies early is reported at once with its
exit status and the tail of its log; every failure, cancellation and :meth:`ServiceLauncher.stop`
ends the whole process group of every service. A death pipe makes services end when the parent
dies, even by SIGKILL: a service written with :func:`run_service` watches it.

The service side is :func:`run_service`::

    async def main(service: ServiceContext) -> None:
        server = await start_my_server()
        service.ready({"address": server.address})
        await service.stopped()
        await server.close()

    run_service(main)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from wirebus import _paths
from wirebus._aio import positive_timeout, resolve
from wirebus.errors import ReadyTimeoutError, ServiceStartupError
from wirebus.ready import (
    READY_ADDRESS_ENV,
    READY_TOKEN_ENV,
    SERVICE_NAME_ENV,
    ReadyCheckReceiver,
    ReadySignal,
    _accept_signal,
    send_ready_signal,
)

__all__ = ["DEATH_FD_ENV", "ServiceContext", "ServiceLauncher", "ServiceSpec", "run_service"]

DEATH_FD_ENV = "WIREBUS_DEATH_FD"
"""Environment variable holding the fd of the death pipe a launched service inherits."""

_LOG_TAIL_LINES = 20
_TIMEOUT_TAIL_LINES = 5
_STATUS_WITHIN = 1.0
_KILL_WAIT = 5.0
_ORPHAN_GRACE = 5.0

_log = logging.getLogger("wirebus.launcher")


@dataclass(frozen=True)
class ServiceSpec:
    """How to start one service: its ``name`` (also its ready identity and log file name),
    ``argv``, extra ``env`` entries (added to the parent's environment) and ``cwd``."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name:
            raise ValueError(f"service name must be a non-empty str without '/', got {name!r}")
        if "\0" in name:
            raise ValueError(f"service name must not contain NUL, got {name!r}")
        if isinstance(self.argv, (str, bytes)):
            raise TypeError(
                f"argv of service {name!r} must be a sequence of str, not one string: {self.argv!r}"
            )
        argv = tuple(self.argv)
        if not argv:
            raise ValueError(f"argv of service {name!r} is empty")
        if not all(isinstance(arg, str) for arg in argv):
            raise TypeError(f"argv of service {name!r} must hold only str, got {argv!r}")
        object.__setattr__(self, "argv", argv)
        if self.env is not None and not all(
            isinstance(key, str) and isinstance(value, str) for key, value in self.env.items()
        ):
            raise TypeError(f"env of service {name!r} must map str to str, got {self.env!r}")


class _Process:
    """A spawned child and a pidfd that becomes readable when it exits."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.pidfd = os.pidfd_open(popen.pid)

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


class _Service(_Process):
    """A spawned service: its spec, process, pidfd and log file."""

    def __init__(self, spec: ServiceSpec, popen: subprocess.Popen[bytes], log_path: str) -> None:
        super().__init__(popen)
        self.spec = spec
        self.log_path = log_path


_WATCHDOG = """
import os, select, signal, sys, time
grace = float(sys.argv[1])
groups = [int(pgid) for pgid in sys.argv[2:]]
leaders = set()
for pgid in groups:
    try:
        leaders.add(os.pidfd_open(pgid))
    except OSError:
        pass
while os.read(0, 512):
    pass
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except OSError:
        pass
deadline = time.monotonic() + grace
while leaders and time.monotonic() < deadline:
    leaders -= set(select.select(list(leaders), [], [], deadline - time.monotonic())[0])
for pgid in groups:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
"""
"""Run with the death pipe as stdin: when the launcher dies, end every service's group."""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _live_groups(pgids: Iterable[int]) -> set[int]:
    """Those of the process groups ``pgids`` that still have a member that is not a zombie."""
    candidates = set()
    for pgid in pgids:
        with contextlib.suppress(OSError):
            os.killpg(pgid, 0)
            candidates.add(pgid)
    live: set[int] = set()
    if not candidates:
        return live
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue
        pgid = int(fields[2])
        if pgid in candidates and fields[0] not in (b"Z", b"X"):
            live.add(pgid)
    return live


def _log_tail(path: str, lines: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * lines))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


def _describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited (its status could not be collected)"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class ServiceLauncher:
    """Starts services, waits until each is ready, and stops them all (and their children).

    ``ready_timeout`` is one deadline for all services of :meth:`start`; ``stop_timeout`` the
    default total deadline of :meth:`stop`. Each service's stdout and stderr go to
    ``<log_dir>/<name>.log``; without ``log_dir`` a fresh temporary directory is used and removed
    by :meth:`stop`. Use it as an async context manager (stop on exit) or call :meth:`stop`.
    """

    def __init__(
        self,
        *,
        ready_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._ready_timeout = positive_timeout("ready_timeout", ready_timeout)
        self._stop_timeout = positive_timeout("stop_timeout", stop_timeout)
        self._log_dir = None if log_dir is None else os.fspath(log_dir)
        self._owns_log_dir = False
        self._services: dict[str, _Service] = {}
        self._state = "new"
        self._start_task: asyncio.Task[Any] | None = None
        self._receiver: ReadyCheckReceiver | None = None
        self._death_read: int | None = None
        self._death_write: int | None = None
        self._watchdog: _Process | None = None
        self._returncodes: dict[str, int] = {}
        self._stopped = asyncio.Event()

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each service started so far (each also leads its process group)."""
        return {name: service.pid for name, service in self._services.items()}

    def log_path(self, name: str) -> str:
        """The log file of service ``name`` (its stdout and stderr); ``KeyError`` if unknown."""
        service = self._services.get(name)
        if service is None:
            raise KeyError(f"no service named {name!r} was started (known: {sorted(self.pids)})")
        return service.log_path

    async def start(self, specs: Sequence[ServiceSpec]) -> dict[str, ReadySignal]:
        """Start every service and return their ready signals by name once all are ready.

        ``ServiceStartupError`` as soon as one cannot be spawned or exits before all are ready
        (with its exit status and log tail); ``ReadyTimeoutError`` naming the services still
        not ready at the deadline. On any failure or cancellation every service is stopped
        before the error propagates. A launcher starts once: a second call is a RuntimeError.
        """
        if self._state != "new":
            raise RuntimeError(f"start() was already called on this launcher ({self._state})")
        specs = tuple(specs)
        seen: set[str] = set()
        for spec in specs:
            if not isinstance(spec, ServiceSpec):
                raise TypeError(f"expected ServiceSpec, got {spec!r}")
            if spec.name in seen:
                raise ValueError(f"duplicate service name {spec.name!r}")
            seen.add(spec.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        self._state = "starting"
        self._start_task = asyncio.current_task()
        try:
            receiver, launch_env, log_dir = self._open()
            for spec in specs:
                self._spawn(spec, launch_env, log_dir)
            self._spawn_watchdog()
            self._close_death_read()
            ready = await self._wait_ready(loop, receiver, deadline)
        except BaseException:
            await self._shutdown(self._stop_timeout)
            raise
        finally:
            self._start_task = None
        self._state = "running"
        return {spec.name: ready[spec.name] for spec in specs}

    def _open(self) -> tuple[ReadyCheckReceiver, dict[str, str], str]:
        """Make the log dir, the ready receiver and the death pipe; return what spawning needs."""
        if self._log_dir is None:
            self._log_dir = tempfile.mkdtemp(prefix="wirebus-logs-", dir=_paths.temp_dir())
            self._owns_log_dir = True
        else:
            os.makedirs(self._log_dir, exist_ok=True)
        token = secrets.token_hex(16)
        self._receiver = ReadyCheckReceiver(token=token)
        self._death_read, self._death_write = os.pipe()
        launch_env = {
            READY_ADDRESS_ENV: self._receiver.address,
            READY_TOKEN_ENV: token,
            DEATH_FD_ENV: str(self._death_read),
        }
        return self._receiver, launch_env, self._log_dir

    def _spawn(self, spec: ServiceSpec, launch_env: Mapping[str, str], log_dir: str) -> None:
        death_read = int(launch_env[DEATH_FD_ENV])
        env = {**os.environ, **(spec.env or {}), **launch_env, SERVICE_NAME_ENV: spec.name}
        log_path = os.path.join(log_dir, f"{spec.name}.log")
        with open(log_path, "wb") as log:
            try:
                popen = subprocess.Popen(
                    spec.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=spec.cwd,
                    start_new_session=True,
                    pass_fds=(death_read,),
                )
            except OSError as exc:
                raise ServiceStartupError(
                    f"cannot start service {spec.name!r} ({list(spec.argv)!r}): {exc}",
                    name=spec.name,
                ) from exc
        try:
            self._services[spec.name] = _Service(spec, popen, log_path)
        except BaseException:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise

    def _spawn_watchdog(self) -> None:
        """Start the process that ends every service group if this process dies, even by SIGKILL.

        Services written with :func:`run_service` also watch the death pipe themselves; the
        watchdog covers every other service (and their children).
        """
        if not self._services:
            return
        popen = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(self._stop_timeout)]
            + [str(service.pid) for service in self._services.values()],
            stdin=self._death_read,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._watchdog = _Process(popen)
        except BaseException:
            popen.kill()
            popen.wait()
            raise

    def _close_death_read(self) -> None:
        if self._death_read is not None:
            os.close(self._death_read)
            self._death_read = None

    async def _wait_ready(
        self, loop: asyncio.AbstractEventLoop, receiver: ReadyCheckReceiver, deadline: float
    ) -> dict[str, ReadySignal]:
        names = frozenset(self._services)
        ready: dict[str, ReadySignal] = {}
        exited: asyncio.Future[_Service] = loop.create_future()

        def on_exit(service: _Service) -> None:
            loop.remove_reader(service.pidfd)
            if not exited.done():
                exited.set_result(service)

        for service in self._services.values():
            loop.add_reader(service.pidfd, on_exit, service)
        try:
            while len(ready) < len(names):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._not_ready_error(names, ready)
                receiving = loop.create_task(receiver.receive(remaining))
                try:
                    await asyncio.wait((receiving, exited), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not receiving.done():
                        receiving.cancel()
                        await asyncio.wait((receiving,))
                if exited.done():
                    raise await self._exit_error(loop, exited.result(), ready)
                try:
                    signal_ = receiving.result()
                except TimeoutError:
                    raise self._not_ready_error(names, ready) from None
                _accept_signal(signal_, names, ready, receiver.address)
        finally:
            for service in self._services.values():
                loop.remove_reader(service.pidfd)
        return ready

    async def _exit_error(
        self, loop: asyncio.AbstractEventLoop, service: _Service, ready: Mapping[str, Any]
    ) -> ServiceStartupError:
        returncode = await _collect_status(loop, service)
        tail = _log_tail(service.log_path, _LOG_TAIL_LINES)
        when = "after it reported ready" if service.spec.name in ready else "before it was ready"
        message = f"service {service.spec.name!r} {_describe_exit(returncode)} {when}"
        if tail:
            message += f"; the last lines of its output:\n{tail}"
        return ServiceStartupError(
            message, name=service.spec.name, returncode=returncode, log_tail=tail
        )

    def _not_ready_error(
        self, names: frozenset[str], ready: Mapping[str, Any]
    ) -> ReadyTimeoutError:
        missing = sorted(names - ready.keys())
        parts = [
            f"services not ready within {self._ready_timeout} s: {missing} (ready: {sorted(ready)})"
        ]
        for name in missing:
            tail = _log_tail(self._services[name].log_path, _TIMEOUT_TAIL_LINES)
            if tail:
                parts.append(f"the last lines of {name!r}:\n{tail}")
        return ReadyTimeoutError("\n".join(parts), missing=missing)

    async def stop(self, timeout: float | None = None) -> dict[str, int]:
        """Stop every service and its children; return each service's exit code by name.

        SIGTERM goes to each service's process group; what is left when ``timeout`` seconds
        (default ``stop_timeout``, one deadline for all) have passed gets SIGKILL; every child is
        reaped. A negative code is the signal that ended the service. Never blocks the event
        loop. Idempotent: later calls return the same dict; before :meth:`start` it returns
        ``{}``. Called while :meth:`start` runs in another task, it cancels that start.
        """
        total = self._stop_timeout if timeout is None else positive_timeout("timeout", timeout)
        if self._state == "new":
            return {}
        if self._state == "starting" and self._start_task is not None:
            self._start_task.cancel()
        if self._state in ("starting", "stopping"):
            await self._stopped.wait()
            return dict(self._returncodes)
        if self._state == "stopped":
            return dict(self._returncodes)
        return await self._shutdown(total)

    async def _shutdown(self, total: float) -> dict[str, int]:
        self._state = "stopping"
        try:
            await self._terminate(total)
        except BaseException:
            self._kill_now()
            raise
        finally:
            self._release()
        return dict(self._returncodes)

    async def _terminate(self, total: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total
        services = list(self._services.values())
        if self._watchdog is not None:
            self._watchdog.popen.kill()
        for service in services:
            _signal_group(service.pid, signal.SIGTERM)
        await _wait_exits(loop, services, deadline)
        delay = 0.002
        while loop.time() < deadline and _live_groups(service.pid for service in services):
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, 0.05)
        for pgid in _live_groups(service.pid for service in services):
            _signal_group(pgid, signal.SIGKILL)
        children = self._children()
        await _wait_exits(loop, children, loop.time() + _KILL_WAIT)
        for child in children:
            await _collect_status(loop, child)
            child.popen.poll()

    def _children(self) -> list[_Process]:
        children: list[_Process] = list(self._services.values())
        if self._watchdog is not None:
            children.append(self._watchdog)
        return children

    def _kill_now(self) -> None:
        """Last resort when stopping is interrupted: SIGKILL every group and reap, blocking."""
        for service in self._services.values():
            _signal_group(service.pid, signal.SIGKILL)
        if self._watchdog is not None:
            self._watchdog.popen.kill()
        for child in self._children():
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(_KILL_WAIT)

    def _release(self) -> None:
        for name, service in self._services.items():
            if service.popen.returncode is None:
                _log.error("service %r (pid %d) could not be reaped", name, service.pid)
            else:
                self._returncodes[name] = service.popen.returncode
        for child in self._children():
            os.close(child.pidfd)
        if self._receiver is not None:
            self._receiver.close()
        self._close_death_read()
        if self._death_write is not None:
            os.close(self._death_write)
            self._death_write = None
        if self._owns_log_dir and self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
        self._state = "stopped"
        self._stopped.set()

    async def __aenter__(self) -> ServiceLauncher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<ServiceLauncher {self._state} {sorted(self._services)}>"


async def _wait_exits(
    loop: asyncio.AbstractEventLoop, children: Sequence[_Process], deadline: float
) -> None:
    """Wait until every process in ``children`` has exited or ``deadline`` passes."""
    pending = {child for child in children if child.exit_status() is None}
    if not pending:
        return
    done: asyncio.Future[None] = loop.create_future()

    def on_exit(child: _Process) -> None:
        loop.remove_reader(child.pidfd)
        pending.discard(child)
        if not pending:
            resolve(done)

    for child in pending:
        loop.add_reader(child.pidfd, on_exit, child)
    timer = loop.call_at(deadline, resolve, done)
    try:
        await done
    finally:
        timer.cancel()
        for child in pending:
            loop.remove_reader(child.pidfd)


async def _collect_status(loop: asyncio.AbstractEventLoop, child: _Process) -> int | None:
    """The exit status of a child whose pidfd reported its exit.

    The pidfd can fire a moment before the status is collectable, so this retries briefly.
    """
    end = loop.time() + _STATUS_WITHIN
    delay = 0.0005
    while (status := child.exit_status()) is None and loop.time() < end:
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    return status


class ServiceContext:
    """What :func:`run_service` hands to a service's ``main``: report ready, learn of stop.

    :func:`run_service` fills ``name``, ``ready_address`` and ``token`` from the environment the
    launcher set; built with the defaults (e.g. to test a service's ``main`` in-process),
    :meth:`ready` does nothing and :meth:`request_stop` plays the launcher's SIGTERM.
    """

    def __init__(self, name: str = "", *, ready_address: str = "", token: str = "") -> None:
        self.name = name
        self.ready_address = ready_address
        self.token = token
        self._stop = asyncio.Event()

    def ready(self, info: Mapping[str, Any] | None = None, *, timeout: float = 5.0) -> None:
        """Report ready to the launcher, with ``info`` for it (e.g. the addresses bound).

        A no-op when the process was not started by a launcher; ``TimeoutError`` when the
        launcher does not take the signal within ``timeout`` seconds.
        """
        if self.ready_address and self.name:
            send_ready_signal(
                self.ready_address, self.name, info, timeout=timeout, token=self.token
            )

    def request_stop(self) -> None:
        """Make :meth:`stopped` return (what SIGTERM, SIGINT or the launcher's death do)."""
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    async def stopped(self) -> None:
        """Return when the service is asked to stop (SIGTERM, SIGINT or the launcher's death)."""
        await self._stop.wait()


def run_service(main: Callable[[ServiceContext], Awaitable[None]]) -> None:
    """Run ``main(service)`` as a launched service; returns when ``main`` does.

    Before ``main`` starts, SIGTERM and SIGINT are routed to ``service.stopped()`` (a second
    signal cancels ``main``, which then counts as a clean stop) and the launcher's death pipe is
    watched: when the launcher dies, the whole process group gets SIGTERM, and SIGKILL 5 s
    later. ``main`` calls ``service.ready(info)`` once it is up, then typically
    ``await service.stopped()`` and cleans up. An exception from ``main`` propagates (the
    process exits non-zero and the traceback lands in the service's log).
    """
    asyncio.run(_serve(main))


async def _serve(main: Callable[[ServiceContext], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    service = ServiceContext(
        os.environ.pop(SERVICE_NAME_ENV, ""),
        ready_address=os.environ.pop(READY_ADDRESS_ENV, ""),
        token=os.environ.pop(READY_TOKEN_ENV, ""),
    )
    death_fd = _death_fd()
    task: asyncio.Future[None] | None = None

    def on_signal() -> None:
        if not service.stop_requested:
            service.request_stop()
        elif task is not None:
            task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if death_fd is not None:
        loop.add_reader(death_fd, _on_death_pipe, loop, death_fd)
    try:
        task = asyncio.ensure_future(main(service))
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled() or not service.stop_requested:
                raise
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if death_fd is not None:
            loop.remove_reader(death_fd)


def _death_fd() -> int | None:
    """The inherited death pipe, or None (logged) when the variable names no open pipe."""
    raw = os.environ.pop(DEATH_FD_ENV, "")
    if not raw:
        return None
    try:
        fd = int(raw)
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (ValueError, OSError):
        is_pipe = False
    if not is_pipe:
        _log.warning(
            "%s=%r is not an open pipe: not watching for the launcher's death", DEATH_FD_ENV, raw
        )
        return None
    os.set_inheritable(fd, False)
    return fd


def _on_death_pipe(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    if os.read(fd, 64):
        return
    loop.remove_reader(fd)
    _log.warning("the launcher is gone: stopping process group %d", os.getpgrp())
    os.killpg(os.getpgrp(), signal.SIGTERM)
    loop.call_later(_ORPHAN_GRACE, os.killpg, os.getpgrp(), signal.SIGKILL)
