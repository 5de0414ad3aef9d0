"""What several test modules share: a small message type with its codec, and polling a
condition against a deadline (where no event exists to wait on, e.g. another process's files).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import msgspec
import pytest

from wirebus import MsgspecCodec


class Tick(msgspec.Struct, omit_defaults=True):
    """A small item; ``price`` at its default is not encoded, so ``Tick(seq)`` is one key."""

    seq: int
    price: float = 0.0


def tick_codec(topic: str = "tick") -> MsgspecCodec[Tick]:
    return MsgspecCodec(Tick, topic=topic)


_POLL_INTERVAL = 0.005


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(_POLL_INTERVAL)


async def wait_until_async(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """:func:`wait_until` without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(_POLL_INTERVAL)
