"""Endpoint addresses: validation, fresh ipc paths, binding with clear errors.

Shared by the transport and the ready-check so that every socket wirebus binds follows the
same rules: only ipc, tcp and inproc; tcp binds loopback unless all interfaces are asked for
explicitly; an address in use is an ``OSError`` naming it.
"""

from __future__ import annotations

import errno
import os

import zmq

SCHEMES = ("ipc", "tcp", "inproc")
_ANY_HOSTS = ("*", "0.0.0.0", "[::]", "::", "[*]")
_IPC_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL


def check_address(address: str, *, bind: bool, allow_any_interface: bool = False) -> str:
    """Return ``address`` after checking its scheme (and, for a tcp bind, its host).

    ``ValueError`` names the address when the scheme is not ipc/tcp/inproc, an ipc path is too
    long, a tcp port is not 1..65535 (a bind may also ask for 0 or *), or a tcp bind would
    listen on every interface without ``allow_any_interface``.
    """
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}: {address!r}")
    scheme, sep, rest = address.partition("://")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(
            f"unsupported address {address!r}: expected ipc://PATH, tcp://HOST:PORT or "
            "inproc://NAME"
        )
    if scheme == "ipc" and len(rest.encode()) > _IPC_PATH_MAX:
        raise ValueError(f"ipc path of {address!r} is longer than {_IPC_PATH_MAX} bytes")
    if scheme == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port:
            raise ValueError(f"tcp address {address!r} needs a host and a port")
        if not _valid_port(port, bind=bind):
            raise ValueError(
                f"tcp port of {address!r} must be 1..65535"
                + (" (or 0 or * to bind a free one)" if bind else "")
            )
        if bind and host in _ANY_HOSTS and not allow_any_interface:
            raise ValueError(
                f"refusing to bind {address!r} on every interface; bind 127.0.0.1 or pass "
                "allow_any_interface=True"
            )
    return address


def _valid_port(port: str, *, bind: bool) -> bool:
    """libzmq accepts a connect to port 99999 and then waits for it forever."""
    if bind and port in ("*", "0"):
        return True
    return port.isdigit() and 1 <= int(port) <= 65535


def new_ipc_address(name: str = "wirebus") -> str:
    """Return a fresh ``ipc://`` address in a new private directory (0o700).

    The directory is removed when the process exits or when :func:`remove_ipc_dir` is called
    with the address.
    """
    import shutil  # here, not at the top: a service that only connects never pays for these
    import tempfile
    import weakref

    from wirebus import _paths

    directory = tempfile.mkdtemp(prefix="wirebus-", dir=_paths.temp_dir())
    path = os.path.join(directory, f"{name}.sock")
    weakref.finalize(_IPC_DIRS, shutil.rmtree, directory, True)
    return f"ipc://{path}"


class _Registry:
    """Holds the finalizers of the ipc directories this process made."""


_IPC_DIRS = _Registry()


def remove_ipc_dir(address: str) -> None:
    """Remove the directory :func:`new_ipc_address` made for ``address`` (if it did)."""
    import shutil

    path = address.removeprefix("ipc://")
    directory = os.path.dirname(path)
    if os.path.basename(directory).startswith("wirebus-"):
        shutil.rmtree(directory, ignore_errors=True)


def _ipc_in_use(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind(sock: zmq.Socket[bytes], address: str, allow_any_interface: bool = False) -> str:
    """Bind ``sock`` to ``address`` and return the endpoint actually bound.

    libzmq silently takes over an ipc path another live socket is bound to; this refuses
    instead. Any address already in use raises ``OSError(EADDRINUSE)`` naming it. A tcp
    endpoint that turns out to listen on every interface (however its host was spelled) is
    unbound again and refused unless ``allow_any_interface``.
    """
    if address.startswith("ipc://") and _ipc_in_use(address[len("ipc://") :]):
        raise OSError(errno.EADDRINUSE, f"address in use: {address!r}")
    try:
        sock.bind(address)
    except zmq.ZMQError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"address in use: {address!r}") from None
        raise OSError(exc.errno, f"cannot bind {address!r}: {exc}") from None
    bound = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(bound, bytes)
    endpoint = bound.decode()
    if not allow_any_interface and endpoint.startswith("tcp://"):
        import ipaddress

        host = endpoint[len("tcp://") :].rpartition(":")[0].strip("[]")
        if ipaddress.ip_address(host).is_unspecified:
            sock.unbind(endpoint)
            raise ValueError(
                f"refusing to bind {address!r}: it listens on every interface ({endpoint}); "
                "bind 127.0.0.1 or pass allow_any_interface=True"
            )
    return endpoint


def connect(sock: zmq.Socket[bytes], address: str) -> str:
    """Connect ``sock`` to ``address``; a malformed address raises ``ValueError`` naming it."""
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        raise ValueError(f"cannot connect to {address!r}: {exc}") from None
    return address
