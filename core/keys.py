"""CurveZMQ keys of one deployment: who may talk on the control plane (router, peer and KV sockets).

1. :func:`write_keys` (``splitserve keys DIR``; ``splitserve up`` makes its own set in a private temporary
   directory): a router certificate and a worker certificate (ZeroMQ's certificate files; the secret ones mode 0600)
   and a ``public/`` folder with both public halves, which is the allow-list.
2. :func:`load`: this process's key pair, the router's and the workers' public keys (the servers it connects to)
   and the allow-list folder.
3. :func:`serve` makes a socket a CURVE server, :func:`connect_to` a CURVE client; :func:`start_authenticator`
   runs ZeroMQ's ZAP handler on a context, so its CURVE servers accept only clients whose public key is in the
   allow-list. A peer without a listed key never completes the handshake: nothing it sends is delivered.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Literal

import zmq
import zmq.auth

logger = logging.getLogger(__name__)

ROLES = ("router", "worker")


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    router_public: bytes
    worker_public: bytes
    allowed_dir: str
    """Folder of the public keys that CURVE servers accept (ZAP allow-list)."""

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public={self.public.decode()}, allowed_dir={self.allowed_dir})"


def write_keys(directory: str) -> None:
    """Write a router and a worker certificate into ``directory`` and their public halves into ``directory/public``."""
    public = os.path.join(directory, "public")
    os.makedirs(public, exist_ok=True)
    os.chmod(directory, 0o700)
    for role in ROLES:
        pub_file, secret_file = zmq.auth.create_certificates(directory, role)
        os.chmod(secret_file, 0o600)
        shutil.move(pub_file, os.path.join(public, os.path.basename(pub_file)))
    logger.info("wrote CurveZMQ keys for %s into %s", ", ".join(ROLES), directory)


def load(directory: str, role: Literal["router", "worker"]) -> CurveKeys:
    """This ``role``'s keys from a folder :func:`write_keys` made; ``ValueError`` naming what is missing."""
    public = os.path.join(directory, "public")
    try:
        own_public, own_secret = zmq.auth.load_certificate(os.path.join(directory, f"{role}.key_secret"))
        router_public, _ = zmq.auth.load_certificate(os.path.join(public, "router.key"))
        worker_public, _ = zmq.auth.load_certificate(os.path.join(public, "worker.key"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--keys-dir {directory}: {exc} (make a set with `splitserve keys {directory}`)") from exc
    if own_secret is None:
        raise ValueError(f"--keys-dir {directory}: {role}.key_secret holds no secret key")
    return CurveKeys(own_public, own_secret, router_public, worker_public, public)


def serve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server (bind it afterwards); with :func:`start_authenticator` on its context."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def connect_to(sock: zmq.Socket, keys: CurveKeys, server_public: bytes) -> None:
    """Make ``sock`` a CURVE client of the server holding ``server_public`` (connect it afterwards)."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def start_authenticator(ctx: zmq.Context, keys: CurveKeys) -> object:
    """ZAP handler on ``ctx`` (a thread) accepting only the allow-listed public keys; keep it, ``.stop()`` at exit."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys.allowed_dir)
    return auth
