"""pytest plugin (entry point ``pytest11``): fixtures for testing code that uses wirebus.

Installed with wirebus; every fixture cleans up after itself.

- ``wirebus_address``: a fresh ``ipc://`` address in a private directory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wirebus._endpoint import new_ipc_address, remove_ipc_dir

__all__ = ["wirebus_address"]


@pytest.fixture
def wirebus_address() -> Iterator[str]:
    """A fresh ``ipc://`` address nobody is bound to; its directory is removed afterwards."""
    address = new_ipc_address("test")
    yield address
    remove_ipc_dir(address)
