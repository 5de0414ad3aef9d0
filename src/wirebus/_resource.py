"""One way to close things: the context-manager protocol every wirebus resource shares.

``with`` calls :meth:`Resource.close`; ``async with`` awaits :meth:`Resource.aclose`, which
closes without blocking the event loop where a subclass needs that. Closing is idempotent.
:class:`State` names where a resource with a life cycle longer than open/closed stands.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from types import TracebackType
from typing import TypeVar

_R = TypeVar("_R", bound="Resource")


class State(enum.Enum):
    """The life cycle of a resource that starts after it is made (e.g. a launcher)."""

    NEW = "new"
    STARTING = "starting"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class Resource(ABC):
    """Base of every wirebus object that holds sockets, files, mappings or processes."""

    @abstractmethod
    def close(self) -> None:
        """Release everything; idempotent."""

    async def aclose(self) -> None:
        """Release everything from async code; the default is :meth:`close`."""
        self.close()

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self: _R) -> _R:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
