"""The exception tree of wirebus.

::

    WirebusError
    ├── KVStoreError            a store that cannot be created, opened, grown or written
    ├── ServiceStartupError     a launched service exited or failed before it was ready
    └── ReadyTimeoutError       (also a TimeoutError) services not ready by the deadline

Standard exceptions are used where they fit: ``ValueError`` for a bad argument (an address, a
topic, a key name), ``TypeError`` for a value of the wrong type, ``OSError`` for an address in
use, ``RuntimeError`` for using a closed object, ``TimeoutError`` for an operation that ran out
of time.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["KVStoreError", "ReadyTimeoutError", "ServiceStartupError", "WirebusError"]


class WirebusError(Exception):
    """Base class of every error wirebus defines."""


class KVStoreError(WirebusError):
    """A key-value store could not be created, opened, grown or written."""


class ServiceStartupError(WirebusError):
    """A service launched by :class:`~wirebus.ServiceLauncher` failed before it was ready.

    ``name`` is the service, ``returncode`` its exit code (negative: killed by that signal,
    ``None``: it had not exited) and ``log_tail`` the last lines of its output.
    """

    def __init__(
        self, message: str, *, name: str, returncode: int | None = None, log_tail: str = ""
    ) -> None:
        super().__init__(message)
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail


class ReadyTimeoutError(WirebusError, TimeoutError):
    """Not every expected party reported ready before the deadline; ``missing`` names them."""

    def __init__(self, message: str, *, missing: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.missing = sorted(missing)
