"""CurveZMQ keys of one deployment: who may talk on the control plane (router, peer and KV sockets).

1. :func:`write_keys` (``splitserve keys DIR [--worker NAME ...]``): a router certificate, a worker certificate that
   every worker may share, and optionally one named certificate per worker id (``DIR/<id>.key_secret``); the
   secret files mode 0600, and a ``public/`` folder with every public half, which is the allow-list.
   :func:`write_process_sets` (``splitserve up``, in a private temporary folder): no shared worker key, but one
   folder per process holding only that process's secret key plus a copy of the allow-list.
2. :func:`load`: this process's key pair (a worker takes ``<its id>.key_secret`` when the folder has one, else the
   shared ``worker.key_secret``), the router's public key, the shared worker public key (if any) and the allow-list.
   :func:`named_workers` reads which worker id each named public key in the allow-list belongs to: the router
   accepts a named key only for its own id, and that id only from its key.
3. :func:`serve` makes a socket a CURVE server, :func:`connect_to` a CURVE client; :func:`start_authenticator`
   runs ZeroMQ's ZAP handler on a context, so its CURVE servers accept only clients whose public key is in the
   allow-list. A peer without a listed key never completes the handshake: nothing it sends is delivered. Every
   worker serves its peer and KV sockets with its own key pair; a client learns that public key from the router
   (``GenerateReq.prefill_key``) or from the descriptor the receiver made (``KVDescriptor.receiver_key``).
4. :func:`client_key` gives the authenticated public key of a received frame (ZAP's User-Id: the z85 text of the
   client's public key), which the router binds worker ids to.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import Literal

import zmq
import zmq.auth

logger = logging.getLogger(__name__)

ROLES = ("router", "worker")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Worker ids that can have a named key (they become file names)."""


@dataclass(frozen=True)
class CurveKeys:
    public: bytes
    secret: bytes
    router_public: bytes
    worker_public: bytes | None
    """The shared worker public key; ``None`` in a set with named keys only (``splitserve up``)."""
    allowed_dir: str
    """Folder of the public keys that CURVE servers accept (ZAP allow-list)."""

    def __repr__(self) -> str:  # never print the secret
        return f"CurveKeys(public={self.public.decode()}, allowed_dir={self.allowed_dir})"


def check_name(name: str) -> str:
    """``name`` when it can name a worker key (letters, digits, ``._-``; not ``router``/``worker``); else ValueError."""
    if not NAME.fullmatch(name) or name in ROLES or name == "public":
        raise ValueError(f"{name!r} cannot name a worker key (letters, digits, '._-'; not router, worker or public)")
    return name


def _certificate(directory: str, public: str, name: str) -> None:
    """``directory/<name>.key_secret`` (mode 0600) and its public half ``public/<name>.key``."""
    if os.path.exists(os.path.join(public, f"{name}.key")):
        raise ValueError(f"{directory} holds a key named {name} already; refusing to overwrite it")
    pub_file, secret_file = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_file, 0o600)
    shutil.move(pub_file, os.path.join(public, os.path.basename(pub_file)))


def write_keys(directory: str, workers: tuple[str, ...] = (), shared: bool = True) -> None:
    """Write the router, the shared worker (``shared``) and each named worker certificate into ``directory``, their
    public halves into ``directory/public``. Named keys may be added to an existing set (``shared=False``)."""
    names = [*(ROLES if shared else ()), *(check_name(w) for w in workers)]
    public = os.path.join(directory, "public")
    taken = [n for n in names if os.path.exists(os.path.join(public, f"{n}.key"))]
    if taken or len(set(names)) != len(names):
        raise ValueError(f"{directory}: keys named {', '.join(taken or names)} exist already (or a name repeats); "
                         "refusing to overwrite them")
    os.makedirs(public, exist_ok=True)
    os.chmod(directory, 0o700)
    for name in names:
        _certificate(directory, public, name)
    logger.info("wrote CurveZMQ keys for %s into %s", ", ".join(names), directory)


def write_process_sets(directory: str, names: list[str]) -> dict[str, str]:
    """``splitserve up``: one folder per process (``router`` and each worker id) holding only its own secret key and
    every public key (the allow-list); returns ``{name: folder}`` (give it as that process's ``--keys-dir``)."""
    os.chmod(directory, 0o700)
    allow = os.path.join(directory, "public")
    os.makedirs(allow)
    folders = {}
    for name in names:
        if name != "router":
            check_name(name)
        folders[name] = os.path.join(directory, name)
        os.makedirs(folders[name], mode=0o700)
        _certificate(folders[name], allow, name)
    for folder in folders.values():
        shutil.copytree(allow, os.path.join(folder, "public"))
    logger.info("wrote one CurveZMQ key pair per process (%s) into %s", ", ".join(names), directory)
    return folders


def load(directory: str, role: Literal["router", "worker"], name: str | None = None) -> CurveKeys:
    """This ``role``'s keys from a folder :func:`write_keys` or :func:`write_process_sets` made; a worker whose id
    (``name``) has a named key there takes it. ``ValueError`` naming what is missing."""
    public = os.path.join(directory, "public")
    own = role
    if role == "worker" and name and NAME.fullmatch(name) and name not in ROLES:
        if os.path.exists(os.path.join(directory, f"{name}.key_secret")):
            own = name
    try:
        own_public, own_secret = zmq.auth.load_certificate(os.path.join(directory, f"{own}.key_secret"))
        router_public, _ = zmq.auth.load_certificate(os.path.join(public, "router.key"))
        shared = os.path.join(public, "worker.key")
        worker_public = zmq.auth.load_certificate(shared)[0] if os.path.exists(shared) else None
    except (OSError, ValueError) as exc:
        raise ValueError(f"--keys-dir {directory}: {exc} (make a set with `splitserve keys {directory}`)") from exc
    if own_secret is None:
        raise ValueError(f"--keys-dir {directory}: {own}.key_secret holds no secret key")
    logger.info("CurveZMQ: %s uses the %s key pair", name or role, "shared worker" if own == "worker" else own)
    return CurveKeys(own_public, own_secret, router_public, worker_public, public)


def named_workers(allowed_dir: str) -> dict[str, str]:
    """``{worker id: z85 public key}`` for the named keys in the allow-list (every ``<id>.key`` but the router's and
    the shared worker's)."""
    found = {}
    for entry in sorted(os.listdir(allowed_dir)):
        stem = entry.removesuffix(".key")
        if entry.endswith(".key") and stem not in ROLES and NAME.fullmatch(stem):
            found[stem] = zmq.auth.load_certificate(os.path.join(allowed_dir, entry))[0].decode("ascii")
    return found


def serve(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server (bind it afterwards); with :func:`start_authenticator` on its context."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def connect_to(sock: zmq.Socket, keys: CurveKeys, server_public: bytes | str | None) -> None:
    """Make ``sock`` a CURVE client of the server holding ``server_public`` (connect it afterwards); ``ValueError``
    when no server key is known."""
    if not server_public:
        raise ValueError("no CurveZMQ public key known for that server (router without keys, or an old router?)")
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public.encode("ascii") if isinstance(server_public, str) else server_public


def start_authenticator(ctx: zmq.Context, keys: CurveKeys) -> object:
    """ZAP handler on ``ctx`` (a thread) accepting only the allow-listed public keys; keep it, ``.stop()`` at exit."""
    from zmq.auth.thread import ThreadAuthenticator

    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=keys.allowed_dir)
    return auth


def client_key(frame: zmq.Frame) -> str | None:
    """The z85 public key a CURVE client authenticated with (ZAP's User-Id of a received frame); ``None`` without."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:  # a frame with no ZAP metadata (plain sockets)
        return None
