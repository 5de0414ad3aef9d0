"""Small asyncio helpers shared by the transport, the ready-check and the launcher."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # loaded by whoever runs a loop; importing it costs a service ~100 ms
    import asyncio


def resolve(future: asyncio.Future[None], exc: BaseException | None = None) -> None:
    """Complete ``future`` (with ``exc`` when given) unless it is already done."""
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


def resolve_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], exc: Exception | None = None
) -> None:
    """:func:`resolve` from another thread; the waiter may have timed out and its loop be gone."""
    if not future.done():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(resolve, future, exc)


async def wait(
    future: asyncio.Future[None], timeout: float | None, message: Callable[[], str]
) -> None:
    """Await ``future``; past ``timeout`` raise ``TimeoutError(message())``."""
    import asyncio

    try:
        await asyncio.wait_for(future, timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(message()) from None


def positive_timeout(name: str, value: float) -> float:
    """Return ``value`` if it is a finite number of seconds above zero, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return float(value)
