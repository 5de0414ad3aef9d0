"""What the reference services share: a subscriber that hands batches to a handler, and a
drain that reads what is already on its way before a service stops."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

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


async def drain(subscriber: ZmqMessageSubscriber[Any], *, quiet: float = _QUIET) -> None:
    """Return once ``subscriber`` got nothing for ``quiet`` s (at most 3 s in all).

    A service asked to stop calls this first, so that events already published reach it
    and are recorded rather than lost with the socket.
    """
    deadline = time.monotonic() + _DRAIN_LIMIT
    seen = -1
    while subscriber.stats.messages != seen and time.monotonic() < deadline:
        seen = subscriber.stats.messages
        await asyncio.sleep(quiet)  # a quiet period is what this waits for, not a sync point
