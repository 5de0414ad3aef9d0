"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses wirebus.

Installed with wirebus; every fixture cleans up after itself. The async fixtures are
pytest-asyncio fixtures, so they work in its default strict mode (async tests marked
``@pytest.mark.asyncio``) and in auto mode alike; the sync ones need no asyncio plugin.

- ``wirebus_address``: a fresh ``ipc://`` address in a private directory.
- ``wirebus_subscriber``: a :class:`SubscriberFactory`,
  ``await wirebus_subscriber(codec, address, **options)`` -> a started
  :class:`CollectingSubscriber` of the codec's item type; every one it made is closed afterwards.
- ``wirebus_kvstore``: a :class:`~wirebus.BasicKVStore` in a fresh private directory,
  unlinked afterwards.
- ``wirebus_launcher``: a :class:`~wirebus.ServiceLauncher` that is always stopped afterwards.

Settings, in the ``[pytest]`` ini section (or ``-o name=value``), or for one test with
``@pytest.mark.wirebus(timeout=..., ready_timeout=..., stop_timeout=..., log_dir=...)``:

- ``wirebus_timeout`` (10 s): the default timeout of ``CollectingSubscriber.wait_for`` and
  ``wait_until``.
- ``wirebus_ready_timeout`` (30 s) and ``wirebus_stop_timeout`` (5 s): the launcher's.
- ``wirebus_log_dir`` (unset): keep the services' logs in ``<log_dir>/<test>/<service>.log``;
  unset, each test's logs go to a temporary directory that is removed with the launcher.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pytest

from wirebus._aio import positive_timeout
from wirebus._endpoint import new_ipc_address, remove_ipc_dir
from wirebus.codec import MessageCodec
from wirebus.transport import ZmqMessageSubscriber

T = TypeVar("T")

try:
    from pytest_asyncio import fixture as _async_fixture
except ImportError:  # no pytest-asyncio: the sync fixtures still work, the async ones say so
    _async_fixture = pytest.fixture  # type: ignore[assignment]

if TYPE_CHECKING:  # imported by the fixtures that use them: the plugin loads in every run
    from wirebus.kvstore import BasicKVStore
    from wirebus.launcher import ServiceLauncher

__all__ = [
    "CollectingSubscriber",
    "SubscriberFactory",
    "wirebus_address",
    "wirebus_kvstore",
    "wirebus_launcher",
    "wirebus_subscriber",
]

_DEFAULT_TIMEOUT = 10.0


class CollectingSubscriber(ZmqMessageSubscriber[T]):
    """Keeps every item it receives in ``items`` and every error in ``errors``.

    ``timeout`` is the default of :meth:`wait_for` and :meth:`wait_until`.
    """

    def __init__(
        self,
        codec: MessageCodec[T],
        address: str,
        *,
        timeout: float = _DEFAULT_TIMEOUT,
        **options: Any,
    ) -> None:
        self.timeout = positive_timeout("timeout", timeout)
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

    async def wait_until(self, condition: Callable[[], bool], timeout: float | None = None) -> None:
        """Return once ``condition()`` holds, checked as items and errors arrive;
        ``TimeoutError`` (with the stats) otherwise."""
        limit = self.timeout if timeout is None else positive_timeout("timeout", timeout)
        deadline = time.monotonic() + limit
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"{self!r}: condition not met within {limit} s; {len(self.items)} items, "
                    f"{self.stats}"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue

    async def wait_for(self, count: int, timeout: float | None = None) -> list[T]:
        """Return ``items`` once it holds at least ``count``; ``TimeoutError`` otherwise."""
        await self.wait_until(lambda: len(self.items) >= count, timeout)
        return self.items


class SubscriberFactory(Protocol):
    """The ``wirebus_subscriber`` fixture: annotate a test's parameter with it, and the
    subscriber it makes keeps the codec's item type (``MsgspecCodec[Tick]`` ->
    ``CollectingSubscriber[Tick]``)."""

    async def __call__(
        self, codec: MessageCodec[T], address: str, **options: Any
    ) -> CollectingSubscriber[T]:
        """A started subscriber; ``options`` go to :class:`CollectingSubscriber`."""


@dataclass(frozen=True)
class _Settings:
    timeout: float
    ready_timeout: float
    stop_timeout: float
    log_dir: str | None


_SETTINGS = {
    "timeout": ("default timeout of CollectingSubscriber.wait_for/wait_until, s", "10"),
    "ready_timeout": ("the launcher's ready_timeout, s", "30"),
    "stop_timeout": ("the launcher's stop_timeout, s", "5"),
    "log_dir": ("keep the launcher's service logs in <this>/<test>/ (unset: removed)", ""),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    for name, (help_, default) in _SETTINGS.items():
        parser.addini(f"wirebus_{name}", help_, default=default)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "wirebus(timeout=, ready_timeout=, stop_timeout=, log_dir=): "
        "this test's settings of the wirebus fixtures",
    )
    _settings(config, {})  # a bad ini value is a usage error before any test runs


def _settings(config: pytest.Config, overrides: dict[str, Any]) -> _Settings:
    values: dict[str, Any] = {}
    for name in _SETTINGS:
        key = f"wirebus_{name}"
        value = overrides.get(name, config.getini(key))
        if name == "log_dir":
            values[name] = os.fspath(value) if value else None
            continue
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise pytest.UsageError(
                    f"{key} must be a number of seconds, got {value!r}"
                ) from None
        try:
            values[name] = positive_timeout(key, value)
        except (TypeError, ValueError) as exc:
            raise pytest.UsageError(str(exc)) from None
    return _Settings(**values)


def _test_settings(request: pytest.FixtureRequest) -> _Settings:
    marker = request.node.get_closest_marker("wirebus")
    overrides = {} if marker is None else dict(marker.kwargs)
    unknown = overrides.keys() - _SETTINGS.keys()
    if unknown:
        raise pytest.UsageError(
            f"{request.node.nodeid}: unknown wirebus marker settings {sorted(unknown)}, "
            f"known: {sorted(_SETTINGS)}"
        )
    return _settings(request.config, overrides)


@pytest.fixture
def wirebus_address() -> Iterator[str]:
    """A fresh ``ipc://`` address nobody is bound to; its directory is removed afterwards."""
    address = new_ipc_address("test")
    yield address
    remove_ipc_dir(address)


@_async_fixture
async def wirebus_subscriber(request: pytest.FixtureRequest) -> AsyncIterator[SubscriberFactory]:
    """A factory of started :class:`CollectingSubscriber` s, all closed afterwards."""
    timeout = _test_settings(request).timeout
    made: list[CollectingSubscriber[Any]] = []

    async def make(codec: MessageCodec[T], address: str, **options: Any) -> CollectingSubscriber[T]:
        options.setdefault("timeout", timeout)
        subscriber = CollectingSubscriber(codec, address, **options)
        made.append(subscriber)
        await subscriber.start()
        return subscriber

    try:
        yield make
    finally:
        for subscriber in made:
            await subscriber.aclose()


@pytest.fixture
def wirebus_kvstore() -> Iterator[BasicKVStore]:
    """A fresh :class:`~wirebus.BasicKVStore`, unlinked afterwards."""
    from wirebus.kvstore import BasicKVStore

    with BasicKVStore() as store:
        yield store


@_async_fixture
async def wirebus_launcher(request: pytest.FixtureRequest) -> AsyncIterator[ServiceLauncher]:
    """A :class:`~wirebus.ServiceLauncher`; whatever it started is stopped afterwards."""
    from wirebus.launcher import ServiceLauncher

    settings = _test_settings(request)
    log_dir = None
    if settings.log_dir is not None:  # one directory per test, kept
        log_dir = os.path.join(settings.log_dir, re.sub(r"[^\w.-]", "_", request.node.nodeid))
    launcher = ServiceLauncher(
        ready_timeout=settings.ready_timeout, stop_timeout=settings.stop_timeout, log_dir=log_dir
    )
    try:
        yield launcher
    finally:
        await launcher.stop()
