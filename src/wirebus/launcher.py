"""Launcher, the parent's side: start services as subprocesses, know when they are ready,
leave none behind.

:class:`ServiceLauncher` checks every :class:`ServiceSpec`, then spawns each in its own process
group with stdin closed, its output in a log file and a ready token of its own, and waits on the
ready signals and on the children's exits together (pidfds), against one deadline. A child that
dies early is reported at once with its exit status and the tail of its log; every failure,
cancellation and :meth:`ServiceLauncher.stop` ends every process of the launch: the services'
process groups, their descendants (also those in a session of their own, found while the
launcher is a child subreaper) and whatever carries the launch's marker. A death pipe and the
watchdog (:mod:`wirebus._watchdog`) do the same when the parent dies, even by SIGKILL.

How the processes are spawned, heard and ended is :mod:`wirebus._children`'s business (its
:class:`~wirebus._children.Launch`); the service's side is :mod:`wirebus.service`
(:func:`~wirebus.run_service`).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from wirebus._aio import positive_timeout
from wirebus._children import Launch, Service, collect_status, watching_exits
from wirebus._resource import Resource, State
from wirebus.errors import ReadyTimeoutError, ServiceStartupError
from wirebus.ready import (
    READY_ADDRESS_ENV,
    READY_TOKEN_ENV,
    SERVICE_NAME_ENV,
    ReadyCheckReceiver,
    ReadySignal,
)

__all__ = ["ServiceLauncher", "ServiceSpec"]

_LOG_TAIL_LINES = 20
_TIMEOUT_TAIL_LINES = 5
_NAME_MAX = 255 - len(".log")


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
        size = len(os.fsencode(name))
        if size > _NAME_MAX:
            raise ValueError(
                f"service name of {size} bytes is too long for its log file name "
                f"(at most {_NAME_MAX}): {name!r}"
            )
        if isinstance(self.argv, (str, bytes)):
            raise TypeError(
                f"argv of service {name!r} must be a sequence of str, not one string: {self.argv!r}"
            )
        argv = tuple(self.argv)
        if not argv:
            raise ValueError(f"argv of service {name!r} is empty")
        if not all(isinstance(arg, str) for arg in argv):
            raise TypeError(f"argv of service {name!r} must hold only str, got {argv!r}")
        if any("\0" in arg for arg in argv):
            raise ValueError(f"argv of service {name!r} contains a NUL character: {argv!r}")
        object.__setattr__(self, "argv", argv)
        if self.env is not None:
            _check_env(name, self.env)
        if self.cwd is not None and "\0" in os.fspath(self.cwd):
            raise ValueError(f"cwd of service {name!r} contains a NUL character: {self.cwd!r}")


def _check_env(name: str, env: Mapping[str, str]) -> None:
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env of service {name!r} must map str to str, got {env!r}")
        if not key or "=" in key or "\0" in key:
            raise ValueError(
                f"env of service {name!r}: {key!r} is not a variable name (empty, '=' or NUL)"
            )
        if "\0" in value:
            raise ValueError(f"env of service {name!r}: the value of {key!r} contains NUL")


def _check_specs(specs: Sequence[ServiceSpec]) -> None:
    """Every check of :meth:`ServiceLauncher.start` that comes before spawning anything."""
    seen: set[str] = set()
    for spec in specs:
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"expected ServiceSpec, got {spec!r}")
        if spec.name in seen:
            raise ValueError(f"duplicate service name {spec.name!r}")
        seen.add(spec.name)
        _check_spawnable(spec)


def _check_spawnable(spec: ServiceSpec) -> None:
    """``ServiceStartupError`` naming the field when ``spec`` could only fail at spawn time."""
    if spec.cwd is not None and not os.path.isdir(spec.cwd):
        raise ServiceStartupError(
            f"cwd of service {spec.name!r} is not a directory: {os.fspath(spec.cwd)!r}",
            name=spec.name,
        )
    program = spec.argv[0]
    search_path = (spec.env or {}).get("PATH", os.environ.get("PATH", os.defpath))
    if "/" in program and spec.cwd is not None:  # the child resolves it after its chdir
        program = os.path.join(spec.cwd, program)
    if shutil.which(program, path=search_path) is None:
        raise ServiceStartupError(
            f"cannot start service {spec.name!r}: argv[0] {spec.argv[0]!r} is not an executable "
            f"program (PATH {search_path!r})",
            name=spec.name,
        ) from FileNotFoundError(errno.ENOENT, "no such executable program", spec.argv[0])


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


class ServiceLauncher(Resource):
    """Starts services, waits until each is ready, and stops them all (and their children).

    ``ready_timeout`` is one deadline for all services of :meth:`start`; ``stop_timeout`` the
    default total deadline of :meth:`stop`. Each service's stdout and stderr go to
    ``<log_dir>/<name>.log``; without ``log_dir`` a fresh temporary directory is used and removed
    by :meth:`stop`. Use it as an async context manager (stop on exit) or call :meth:`stop`
    (:meth:`aclose` is the same; :meth:`close` stops from sync code, blocking).
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
        self._launch = Launch(None if log_dir is None else os.fspath(log_dir), self._stop_timeout)
        self._state = State.NEW
        self._start_task: asyncio.Task[Any] | None = None
        self._receiver: ReadyCheckReceiver | None = None
        self._returncodes: dict[str, int] = {}
        self._stopped = asyncio.Event()

    @property
    def pids(self) -> dict[str, int]:
        """The process id of each service started so far (each also leads its process group)."""
        return {name: service.pid for name, service in self._launch.services.items()}

    def log_path(self, name: str) -> str:
        """The log file of service ``name`` (its stdout and stderr); ``KeyError`` if unknown."""
        service = self._launch.services.get(name)
        if service is None:
            raise KeyError(f"no service named {name!r} was started (known: {sorted(self.pids)})")
        return service.log_path

    async def start(self, specs: Sequence[ServiceSpec]) -> dict[str, ReadySignal]:
        """Start every service and return their ready signals by name once all are ready.

        Every spec is checked before anything is spawned (``TypeError``/``ValueError`` for a
        bad argument, ``ServiceStartupError`` naming the field for a ``cwd`` that is not a
        directory or a program that is not there). ``ServiceStartupError`` as soon as one
        cannot be spawned or exits before all are ready (with its exit status and log tail);
        ``ReadyTimeoutError`` naming the services still not ready at the deadline. On any
        failure or cancellation every service is stopped before the error propagates. A
        launcher starts once: a second call is a RuntimeError.
        """
        if self._state is not State.NEW:
            raise RuntimeError(f"a launcher starts once; this one is {self._state.value}")
        specs = tuple(specs)
        _check_specs(specs)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout
        self._state = State.STARTING
        self._start_task = asyncio.current_task()
        try:
            tokens = {spec.name: secrets.token_hex(16) for spec in specs}
            self._launch.open()
            self._receiver = receiver = ReadyCheckReceiver(token=tokens)
            for spec in specs:
                env = {
                    **(spec.env or {}),
                    READY_ADDRESS_ENV: receiver.address,
                    READY_TOKEN_ENV: tokens[spec.name],
                    SERVICE_NAME_ENV: spec.name,
                }
                self._launch.spawn(spec.name, spec.argv, env, spec.cwd)
            ready_dir = os.path.dirname(receiver.address.removeprefix("ipc://"))
            self._launch.watch([ready_dir] if receiver.owns_address else [])
            ready = await self._wait_ready(loop, receiver, deadline)
        except BaseException:
            await self._shutdown(self._stop_timeout)
            raise
        finally:
            self._start_task = None
        self._state = State.OPEN
        return {spec.name: ready[spec.name] for spec in specs}

    async def _wait_ready(
        self, loop: asyncio.AbstractEventLoop, receiver: ReadyCheckReceiver, deadline: float
    ) -> dict[str, ReadySignal]:
        names = frozenset(self._launch.services)
        ready: dict[str, ReadySignal] = {}
        exited: asyncio.Future[Service] = loop.create_future()

        def on_exit(service: Service) -> None:
            if not exited.done():
                exited.set_result(service)

        with watching_exits(loop, self._launch.services.values(), on_exit):
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
                ready[signal_.identity] = signal_  # the receiver checked identity and token
        return ready

    async def _exit_error(
        self, loop: asyncio.AbstractEventLoop, service: Service, ready: Mapping[str, Any]
    ) -> ServiceStartupError:
        returncode = await collect_status(loop, service)
        tail = _log_tail(service.log_path, _LOG_TAIL_LINES)
        when = "after it reported ready" if service.name in ready else "before it was ready"
        message = f"service {service.name!r} {_describe_exit(returncode)} {when}"
        if tail:
            message += f"; the last lines of its output:\n{tail}"
        return ServiceStartupError(message, name=service.name, returncode=returncode, log_tail=tail)

    def _not_ready_error(
        self, names: frozenset[str], ready: Mapping[str, Any]
    ) -> ReadyTimeoutError:
        missing = sorted(names - ready.keys())
        parts = [
            f"services not ready within {self._ready_timeout} s: {missing} (ready: {sorted(ready)})"
        ]
        for name in missing:
            tail = _log_tail(self._launch.services[name].log_path, _TIMEOUT_TAIL_LINES)
            if tail:
                parts.append(f"the last lines of {name!r}:\n{tail}")
        return ReadyTimeoutError("\n".join(parts), missing=missing)

    async def stop(self, timeout: float | None = None) -> dict[str, int]:
        """Stop every service and its children; return each service's exit code by name.

        SIGTERM goes to every process of the launch (each service's process group, every
        descendant, also one in a session of its own); what is left when ``timeout`` seconds
        (default ``stop_timeout``, one deadline for all) have passed gets SIGKILL; every child
        is reaped. A negative code is the signal that ended the service. Never blocks the event
        loop. Idempotent: later calls return the same dict; before :meth:`start` it returns
        ``{}``. Called while :meth:`start` runs in another task, it cancels that start.
        """
        total = self._stop_timeout if timeout is None else positive_timeout("timeout", timeout)
        if self._state is State.NEW:
            return {}
        if self._state is State.STARTING and self._start_task is not None:
            self._start_task.cancel()
        if self._state in (State.STARTING, State.CLOSING):
            await self._stopped.wait()
            return dict(self._returncodes)
        if self._state is State.CLOSED:
            return dict(self._returncodes)
        return await self._shutdown(total)

    async def aclose(self) -> None:
        """:meth:`stop` with the default deadline."""
        await self.stop()

    def close(self) -> None:
        """Stop from sync code, as :meth:`stop` does but blocking; idempotent.

        ``RuntimeError`` while :meth:`start` or :meth:`stop` runs: await :meth:`stop` instead.
        """
        if self._state is State.NEW:
            self._state = State.CLOSED
            self._stopped.set()
            return
        if self._state in (State.STARTING, State.CLOSING):
            raise RuntimeError(
                f"close() while the launcher is {self._state.value}: await stop() instead"
            )
        if self._state is State.CLOSED:
            return
        self._state = State.CLOSING
        try:
            self._launch.end_blocking(self._stop_timeout)
        finally:
            self._release()

    async def _shutdown(self, total: float) -> dict[str, int]:
        self._state = State.CLOSING
        try:
            await self._launch.end(total)
        except BaseException:
            self._launch.end_blocking(0)
            raise
        finally:
            self._release()
        return dict(self._returncodes)

    def _release(self) -> None:
        self._returncodes.update(self._launch.release())
        if self._receiver is not None:
            self._receiver.close()
        self._state = State.CLOSED
        self._stopped.set()

    def __repr__(self) -> str:
        return f"<ServiceLauncher {self._state.value} {sorted(self._launch.services)}>"
