"""The service's side of the launcher: :func:`run_service` runs a service's ``main``.

The parent's side is :mod:`wirebus.launcher`. A service written with :func:`run_service`
reports ready through its :class:`ServiceContext`, learns of a stop request (SIGTERM, SIGINT,
the launcher's death) by awaiting :meth:`ServiceContext.stopped`, and ends itself and every
process it started when the launcher dies, even by SIGKILL (the death pipe)::

    async def main(service: ServiceContext) -> None:
        server = await start_my_server()
        service.ready({"address": server.address})
        await service.stopped()
        await server.close()

    run_service(main)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from wirebus._watchdog import Sweep
from wirebus.ready import _take_launch_env, send_ready_signal

__all__ = ["DEATH_FD_ENV", "ServiceContext", "run_service"]

DEATH_FD_ENV = "WIREBUS_DEATH_FD"
"""Environment variable holding the fd of the death pipe a launched service inherits."""

_ORPHAN_GRACE = 5.0

_log = logging.getLogger("wirebus.service")


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
    watched: when the launcher dies, the service's process group and every process it started
    get SIGTERM, and SIGKILL 5 s later. ``main`` calls ``service.ready(info)`` (or
    :func:`~wirebus.notify_ready`) once it is up, then typically ``await service.stopped()`` and
    cleans up. An exception from ``main`` propagates (the process exits non-zero and the
    traceback lands in the service's log).
    """
    asyncio.run(_serve(main))


async def _serve(main: Callable[[ServiceContext], Awaitable[None]]) -> None:
    loop = asyncio.get_running_loop()
    launch = _take_launch_env()
    if launch is None:
        service = ServiceContext()
    else:
        service = ServiceContext(launch.identity, ready_address=launch.address, token=launch.token)
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
    _log.warning("the launcher is gone: stopping process group %d and its own", os.getpgrp())
    sweep = Sweep([os.getpid()], None)
    sweep.signal(signal.SIGTERM)
    os.killpg(os.getpgrp(), signal.SIGTERM)
    loop.call_later(_ORPHAN_GRACE, _kill_all, sweep)


def _kill_all(sweep: Sweep) -> None:
    sweep.signal(signal.SIGKILL)
    sweep.close()
    os.killpg(os.getpgrp(), signal.SIGKILL)
