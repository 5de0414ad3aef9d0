"""One socket set-up and release for publishers and subscribers: context, options, CURVE,
heartbeats, bind or connect, and closing all of it in the right order."""

from __future__ import annotations

from typing import Any

import zmq

from wirebus import _endpoint, security
from wirebus.security import CurveClient, CurveServer

_MAX_HEARTBEAT_TTL = 6_553_599  # ms: the largest TTL a ZMTP PING carries


class OwnedSocket:
    """A configured ZMQ socket with what it needs: its context (private when asked, or when a
    ZAP authenticator needs one) and the authenticator. :meth:`close` releases them all.

    ``options`` (pairs, in order) are set before anything else; ``bind`` binds ``address``,
    otherwise it is connected. :attr:`address` is the endpoint actually bound (or the one
    connected). It keeps its security settings (:attr:`curve`, :attr:`heartbeat`,
    :attr:`allow_any_interface`) for a socket that is to share them.
    """

    def __init__(
        self,
        kind: int,
        address: str,
        *,
        bind: bool,
        context: zmq.Context[Any] | None,
        private_context: bool,
        options: list[tuple[int, int | bytes]],
        curve: CurveServer | CurveClient | None,
        heartbeat: int,
        allow_any_interface: bool,
        owner: str,
    ) -> None:
        _endpoint.check_address(address, bind=bind, allow_any_interface=allow_any_interface)
        _check_security(curve, address, context, heartbeat)
        self.curve = curve
        self.heartbeat = heartbeat
        self.allow_any_interface = allow_any_interface
        self.authenticator: security._Authenticator | None = None
        self.own_context: zmq.Context[Any] | None = None
        if context is None and (private_context or security._needs_authenticator(curve)):
            self.own_context = zmq.Context(io_threads=1)
        self.context: zmq.Context[Any] = context or self.own_context or zmq.Context.instance()
        self.socket: zmq.Socket[bytes] = self.context.socket(kind)
        try:
            for option, value in options:
                self.socket.setsockopt(option, value)
            _set_heartbeat(self.socket, heartbeat, connecting=not bind)
            security._configure(self.socket, curve)
            if isinstance(curve, CurveServer) and curve.allowed_clients is not None:
                self.authenticator = security._Authenticator(self.context, curve, owner)
            if bind:
                self.address = _endpoint.bind(self.socket, address, allow_any_interface)
            else:
                self.address = _endpoint.connect(self.socket, address)
        except BaseException:
            self.close(linger=0)
            raise

    def close(self, linger: int) -> None:
        """Close the socket (delivering for up to ``linger`` ms), stop the authenticator, end
        a private context (which waits for that delivery)."""
        self.socket.close(linger=linger)
        if self.authenticator is not None:
            # Handshakes under way fail from here on (ZAP_ENFORCE_DOMAIN); delivery over
            # connections already authenticated goes on while term() waits for it.
            self.authenticator.close()
        if self.own_context is not None:
            self.own_context.term()


def _check_security(
    curve: CurveServer | CurveClient | None,
    address: str,
    context: zmq.Context[Any] | None,
    heartbeat: int,
) -> None:
    if not isinstance(heartbeat, int) or heartbeat < 0:
        raise ValueError(f"heartbeat must be an int >= 0 ms (0: off), got {heartbeat!r}")
    security._check_curve(curve, address)
    if context is not None and security._needs_authenticator(curve):
        raise ValueError(
            "a CurveServer with allowed_clients runs a ZAP authenticator in a ZMQ context of "
            "its own: do not pass context"
        )


def _set_heartbeat(sock: zmq.Socket[bytes], heartbeat: int, connecting: bool) -> None:
    """ZMTP heartbeats every ``heartbeat`` ms; a peer silent for 3x that is disconnected.

    ``HEARTBEAT_TIMEOUT`` drops the connection when nothing arrives for ``3 * heartbeat`` ms
    after a PING, ``HEARTBEAT_TTL`` asks the peer to do the same. A connecting socket also
    gives up a TCP connect that has not completed in ``3 * heartbeat`` ms
    (``CONNECT_TIMEOUT``) and retries, so it reconnects promptly once a cut link is back
    instead of waiting out the kernel's SYN back-off. ``0`` changes nothing.
    """
    if heartbeat == 0:
        return
    timeout = 3 * heartbeat
    sock.setsockopt(zmq.HEARTBEAT_IVL, heartbeat)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, min(timeout, _MAX_HEARTBEAT_TTL))
    if connecting:
        sock.setsockopt(zmq.CONNECT_TIMEOUT, timeout)
