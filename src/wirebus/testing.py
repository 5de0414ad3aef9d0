"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses wirebus.

Installed with wirebus; every fixture cleans up after itself. Async fixtures need an asyncio
pytest plugin (pytest-asyncio) in the using project.

- ``wirebus_address``: a fresh ``ipc://`` address in a private directory.
- ``wirebus_subscriber``: a factory ``(codec, address, **options) -> CollectingSubscriber``,
  started and connected; every subscriber it made is closed afterwards.
- ``wirebus_kvstore``: a :class:`~wirebus.BasicKVStore` in a fresh private directory,
  unlinked afterwards.
- ``wirebus_launcher``: a :class:`~wirebus.ServiceLauncher` that is always stopped afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from wirebus._endpoint import new_ipc_address, remove_ipc_dir
from wirebus.codec import MessageCodec
from wirebus.transport import ZmqMessageSubscriber

T = TypeVar("T")

if TYPE_CHECKING:  # imported by the fixtures that use them: the plugin loads in every run
    from wirebus.kvstore import BasicKVStore
    from wirebus.launcher import ServiceLauncher

__all__ = [
    "CollectingSubscriber",
    "wirebus_address",
    "wirebus_kvstore",
    "wirebus_launcher",
    "wirebus_subscriber",
]


class CollectingSubscriber(ZmqMessageSubscriber[T]):
    """Keeps every item it receives in ``items`` and every error in ``errors``."""

    def __init__(self, codec: MessageCodec[T], address: str, **options: Any) -> None:
        super().__init__(codec, address, **options)
        self.items: list[T] = []
        self.errors: list[tuple[BaseException, bytes | None]] = []
        self._changed = asyncio.Event()

    async def process(self, items: list[T]) -> None:
        self.items.extend(items)
        self._changed.set()

    async def on_error(self, exc: BaseException, payload: bytes | None) -> None:
        self.errors.append((exc, payload))
        self._changed.set()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Return once ``condition()`` holds, checked as items and errors arrive;
        ``TimeoutError`` (with the stats) otherwise."""
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self!r}: condition not met within {timeout} s; {len(self.items)} items, "
                    f"{self.stats}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[T]:
        """Return ``items`` once it holds at least ``count``; ``TimeoutError`` otherwise."""
        await self.wait_until(lambda: len(self.items) >= count, timeout)
        return self.items


@pytest.fixture
def wirebus_address() -> Iterator[str]:
    """A fresh ``ipc://`` address nobody is bound to; its directory is removed afterwards."""
    address = new_ipc_address("test")
    yield address
    remove_ipc_dir(address)


@pytest.fixture
async def wirebus_subscriber() -> AsyncIterator[
    Callable[..., Awaitable[CollectingSubscriber[Any]]]
]:
    """A factory of started :class:`CollectingSubscriber` s, all closed afterwards."""
    made: list[CollectingSubscriber[Any]] = []

    async def make(
        codec: MessageCodec[Any], address: str, **options: Any
    ) -> CollectingSubscriber[Any]:
        subscriber: CollectingSubscriber[Any] = CollectingSubscriber(codec, address, **options)
        made.append(subscriber)
        await subscriber.start()
        return subscriber

    yield make
    for subscriber in made:
        await subscriber.aclose()


@pytest.fixture
def wirebus_kvstore() -> Iterator[BasicKVStore]:
    """A fresh :class:`~wirebus.BasicKVStore`, unlinked afterwards."""
    from wirebus.kvstore import BasicKVStore

    with BasicKVStore() as store:
        yield store


@pytest.fixture
async def wirebus_launcher() -> AsyncIterator[ServiceLauncher]:
    """A :class:`~wirebus.ServiceLauncher`; whatever it started is stopped afterwards."""
    from wirebus.launcher import ServiceLauncher

    launcher = ServiceLauncher(ready_timeout=30, stop_timeout=5)
    try:
        yield launcher
    finally:
        await launcher.stop()
