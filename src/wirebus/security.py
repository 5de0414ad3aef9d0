"""CurveZMQ for wirebus sockets: key helpers, server and client settings, the ZAP allow-list.

A CURVE *server* socket holds a long-term key pair that its clients know the public half of;
a CURVE *client* holds its own key pair and the server's public key. Either side of a
publisher/subscriber pair may be the server, usually the one that binds. With
``allowed_clients`` the server runs a ZAP authenticator (``zmq.auth.thread.ThreadAuthenticator``)
in a private ZMQ context and only clients whose public key is on the list complete the
handshake; without it any client that knows the server's public key may connect (encryption
without authentication). See ``docs/deployment.md``.

Keys are Z85 text, 40 characters (``bytes`` or ``str``); 32-byte raw keys are accepted too.
Key files use the ZeroMQ certificate format (``zmq.auth.load_certificate`` reads them).
"""

from __future__ import annotations

import datetime
import logging
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq
from zmq.utils import z85

from wirebus._resource import Resource

if TYPE_CHECKING:  # imported when needed: zmq.auth pulls in zmq.asyncio
    from zmq.auth.thread import ThreadAuthenticator

__all__ = [
    "CurveClient",
    "CurveServer",
    "generate_curve_keypair",
    "load_curve_keys",
    "load_curve_public_keys",
    "save_curve_keypair",
]

_log = logging.getLogger("wirebus.security")

_ZAP_DOMAIN = b"wirebus"
"""The ZAP domain of every wirebus CURVE server socket."""

_MAX_WARNED_KEYS = 64


def _require_curve() -> None:
    if not zmq.has("curve"):
        raise RuntimeError(
            f"this libzmq ({zmq.zmq_version()}) was built without CURVE support (zmq.has('curve') "
            "is False); install a pyzmq wheel, which bundles libzmq with libsodium"
        )


def _key(value: bytes | str, what: str) -> bytes:
    """Return ``value`` as a 40-byte Z85 key; ``ValueError`` naming ``what`` otherwise.

    The value itself is never put in the message: it may be a secret key.
    """
    if isinstance(value, str):
        try:
            value = value.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"{what} must be a 40-character Z85 CURVE key") from None
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes or str, got {type(value).__name__}")
    if len(value) == 32:  # raw binary key
        return z85.encode(value)
    if len(value) != 40:
        raise ValueError(
            f"{what} must be a 40-character Z85 CURVE key (or 32 raw bytes), got {len(value)} bytes"
        )
    try:
        raw = z85.decode(value)
    except (ValueError, KeyError, IndexError, struct.error):  # struct.error: a value > 2**32
        raise ValueError(f"{what} is not valid Z85 text") from None
    if len(raw) != 32:
        raise ValueError(f"{what} is not valid Z85 text")
    return value


def _check_pair(public_key: bytes, secret_key: bytes, what: str) -> None:
    if zmq.curve_public(secret_key) != public_key:
        raise ValueError(f"{what}: public_key is not the public half of secret_key")


@dataclass(frozen=True)
class CurveServer:
    """CURVE settings of the server side of a connection (usually the side that binds).

    ``public_key``/``secret_key`` are the server's long-term key pair; clients are given
    ``public_key``. ``allowed_clients`` lists the public keys of the clients allowed to
    connect; ``None`` lets any client that knows the server's public key connect (the traffic
    is still encrypted). An allow-list needs a ZAP authenticator, which needs a ZMQ context of
    its own: a socket configured with one must not be given a ``context``.
    """

    public_key: bytes
    secret_key: bytes = field(repr=False)
    allowed_clients: frozenset[bytes] | None = None

    def __init__(
        self,
        public_key: bytes | str,
        secret_key: bytes | str,
        allowed_clients: Iterable[bytes | str] | None = None,
    ) -> None:
        _require_curve()
        public = _key(public_key, "CurveServer public_key")
        secret = _key(secret_key, "CurveServer secret_key")
        _check_pair(public, secret, "CurveServer")
        allowed: frozenset[bytes] | None = None
        if allowed_clients is not None:
            if isinstance(allowed_clients, (bytes, str)):
                raise TypeError(
                    "allowed_clients must be an iterable of public keys, not a single key"
                )
            allowed = frozenset(_key(k, "an allowed_clients key") for k in allowed_clients)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "secret_key", secret)
        object.__setattr__(self, "allowed_clients", allowed)


@dataclass(frozen=True)
class CurveClient:
    """CURVE settings of the client side: the server's public key and the client's key pair.

    A server with ``allowed_clients`` admits this client only if ``public_key`` is on its list.
    """

    server_public_key: bytes
    public_key: bytes
    secret_key: bytes = field(repr=False)

    def __init__(
        self,
        server_public_key: bytes | str,
        public_key: bytes | str,
        secret_key: bytes | str,
    ) -> None:
        _require_curve()
        server = _key(server_public_key, "CurveClient server_public_key")
        public = _key(public_key, "CurveClient public_key")
        secret = _key(secret_key, "CurveClient secret_key")
        _check_pair(public, secret, "CurveClient")
        object.__setattr__(self, "server_public_key", server)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "secret_key", secret)


def generate_curve_keypair() -> tuple[bytes, bytes]:
    """A new CURVE key pair ``(public, secret)``, Z85 text of 40 bytes each."""
    _require_curve()
    return zmq.curve_keypair()


def save_curve_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Generate a key pair and write it as ZeroMQ certificates; return ``(public, secret)`` paths.

    ``NAME.key`` holds the public key (give it to the peers), ``NAME.key_secret`` both keys
    (mode 0o600; keep it on this host). Neither file may exist already (``FileExistsError``).
    Both are read by :func:`load_curve_keys`, ``zmq.auth.load_certificate`` and czmq.
    """
    public, secret = generate_curve_keypair()
    base = Path(directory) / name
    public_path = base.with_name(base.name + ".key")
    secret_path = base.with_name(base.name + ".key_secret")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    _write_certificate(public_path, 0o644, f"#   ZeroMQ CURVE Public Certificate ({now})\n", public)
    try:
        _write_certificate(
            secret_path,
            0o600,
            f"#   ZeroMQ CURVE **Secret** Certificate ({now}): do not share this file\n",
            public,
            secret,
        )
    except BaseException:
        public_path.unlink()
        raise
    return public_path, secret_path


def _write_certificate(
    path: Path, mode: int, banner: str, public: bytes, secret: bytes | None = None
) -> None:
    text = f'{banner}\nmetadata\ncurve\n    public-key = "{public.decode("ascii")}"\n'
    if secret is not None:
        text += f'    secret-key = "{secret.decode("ascii")}"\n'
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(text)


def load_curve_keys(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    """Read a ZeroMQ certificate file: ``(public, secret)``, ``secret`` ``None`` if absent.

    ``OSError`` when the file does not exist, ``ValueError`` when it holds no valid key.
    """
    from zmq.auth.certs import load_certificate

    public, secret = load_certificate(path)
    public = _key(public, f"the public key in {os.fspath(path)!r}")
    if secret is not None:
        secret = _key(secret, f"the secret key in {os.fspath(path)!r}")
    return public, secret


def load_curve_public_keys(directory: str | os.PathLike[str]) -> list[bytes]:
    """The public keys of every ``*.key`` certificate in ``directory`` (for ``allowed_clients``)."""
    from zmq.auth.certs import load_certificates

    return sorted(_key(k, "a public key") for k in load_certificates(directory))


# -- applying the settings to a socket (used by wirebus.transport) ---------------------------


def _check_curve(curve: CurveServer | CurveClient | None, address: str) -> None:
    """``TypeError``/``ValueError`` for settings that cannot work with ``address``."""
    if curve is None:
        return
    if not isinstance(curve, (CurveServer, CurveClient)):
        raise TypeError(f"curve must be a CurveServer or a CurveClient, got {curve!r}")
    if address.startswith("inproc://"):
        raise ValueError(
            f"CURVE on {address!r}: inproc never leaves the process, there is nothing to "
            "encrypt or authenticate; use tcp:// (or ipc://)"
        )


def _needs_authenticator(curve: CurveServer | CurveClient | None) -> bool:
    """True when ``curve`` is a server with an allow-list, so it needs a private context."""
    return isinstance(curve, CurveServer) and curve.allowed_clients is not None


def _configure(sock: zmq.Socket[Any], curve: CurveServer | CurveClient | None) -> None:
    """Set the CURVE options of ``sock`` (before it binds or connects)."""
    if isinstance(curve, CurveServer):
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
        sock.setsockopt(zmq.ZAP_DOMAIN, _ZAP_DOMAIN)
        if curve.allowed_clients is not None:
            # Fail closed: without a ZAP handler (e.g. once it is stopped at close) libzmq
            # would otherwise let every client in.
            sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    elif isinstance(curve, CurveClient):
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_public_key)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)


class _Authenticator(Resource):
    """The ZAP handler of one private context: admits the CURVE clients on an allow-list.

    Runs pyzmq's ``ThreadAuthenticator`` (a thread and two inproc sockets in ``context``);
    :meth:`close` must be called before ``context.term()``. ``owner`` names the socket in log
    messages. ``rejected`` counts refused
    handshakes; the first refusal of each key (up to 64 keys) is logged as a warning on the
    ``wirebus.security`` logger, later ones at debug level (a refused client retries).
    """

    def __init__(self, context: zmq.Context[Any], server: CurveServer, owner: str) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        assert server.allowed_clients is not None
        self._allowed = server.allowed_clients
        self.owner = owner
        self._warned: set[bytes] = set()
        self.rejected = 0
        self._auth: ThreadAuthenticator | None = ThreadAuthenticator(
            context, log=logging.getLogger("wirebus.security.zap")
        )
        try:
            self._auth.start()
            self._auth.configure_curve_callback(
                domain=_ZAP_DOMAIN.decode(), credentials_provider=self
            )
        except BaseException:
            self.close()
            raise

    def callback(self, domain: str, client_key: bytes) -> bool:
        """Called by the authenticator thread for each CURVE handshake."""
        if client_key in self._allowed:
            return True
        self.rejected += 1
        if client_key not in self._warned and len(self._warned) < _MAX_WARNED_KEYS:
            self._warned.add(client_key)
            _log.warning(
                "%s: refused a CURVE client whose public key %s is not allowed",
                self.owner,
                client_key.decode("ascii", "replace"),
            )
        else:
            _log.debug("%s: refused CURVE client %r", self.owner, client_key)
        return False

    def close(self) -> None:
        """Stop the thread and close its sockets; idempotent."""
        auth, self._auth = self._auth, None
        if auth is not None:
            auth.stop()
