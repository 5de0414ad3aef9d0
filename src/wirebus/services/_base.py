"""What the reference services share: a subscriber that hands batches to a handler, and
:func:`drain`, which reads what is already on its way before a service stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from wirebus._aio import positive_timeout
from wirebus.codec import MessageCodec
from wirebus.transport import ZmqMessageSubscriber

T = TypeVar("T")

_QUIET = 0.1
_DRAIN_LIMIT = 3.0


class HandlerSubscriber(ZmqMessageSubscriber[T]):
    """A subscriber whose batches go to ``handler(items)`` (a plain function)."""

    def __init__(
        self,
        codec: MessageCodec[T],
        address: str,
        handler: Callable[[list[T]], None],
        **options: Any,
    ) -> None:
        super().__init__(codec, address, **options)
        self._handler = handler

    async def process(self, items: list[T]) -> None:
        self._handler(items)


async def drain(
    subscriber: ZmqMessageSubscriber[Any], *, quiet: float = _QUIET, limit: float = _DRAIN_LIMIT
) -> int:
    """Return once ``subscriber`` got nothing for ``quiet`` s (after at most ``limit`` s).

    A service asked to stop calls this before it closes its subscriber, so that events already
    published (in flight in ZeroMQ's queues) reach it and are recorded rather than lost with the
    socket. Returns how many ZeroMQ messages arrived meanwhile. There is no event for "nothing
    more is coming": a quiet period is what this waits for.
    """
    positive_timeout("quiet", quiet)
    positive_timeout("limit", limit)
    deadline = time.monotonic() + limit
    first = seen = subscriber.stats.messages
    while True:
        await asyncio.sleep(min(quiet, max(0.0, deadline - time.monotonic())))
        now = subscriber.stats.messages
        if now == seen or time.monotonic() >= deadline:
            return now - first
        seen = now
