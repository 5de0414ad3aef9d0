"""Where wirebus puts its files: one setting for every directory it makes.

``WIREBUS_RUNTIME_DIR``, when set, is the base of everything wirebus creates on disk: KV stores
made without a path, ipc socket directories, the launcher's log directories. Unset, stores go
to ``/dev/shm`` (the temp dir where it does not exist) and the rest to the temp dir. A test run,
or a harness that wants its files in one place, sets it to a private directory of its own.
"""

from __future__ import annotations

import os
import tempfile

RUNTIME_DIR_ENV = "WIREBUS_RUNTIME_DIR"


def shm_dir() -> str:
    """The base directory for KV stores: memory-backed where the platform has one."""
    configured = os.environ.get(RUNTIME_DIR_ENV)
    if configured:
        return configured
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def temp_dir() -> str:
    """The base directory for ipc sockets and log directories."""
    return os.environ.get(RUNTIME_DIR_ENV) or tempfile.gettempdir()
