"""``splitserve keys DIR [--worker ID ...]``: write a CurveZMQ key set for a deployment (core/keys.py says who holds
which key).

1. A router and a shared worker certificate go into DIR (secret files mode 0600), their public halves into
   DIR/public (the allow-list). Each ``--worker ID`` adds a key pair named for that worker id (``DIR/ID.key_secret``,
   ``DIR/public/ID.key``); with a set already in DIR, ``--worker`` only adds those (then restart the router and the
   workers: they read the allow-list at start).
2. Give every process ``--keys-dir DIR`` (or ``SPLITSERVE_KEYS_DIR``; in containers, mount DIR as a secret): the
   router's control socket, the workers' peer sockets and their KV receivers then accept only those keys. A worker
   started with ``--worker-id ID`` uses ``ID.key_secret`` when DIR has it, else the shared worker key; the router
   accepts worker id ID only from its named key (give each worker only its own secret file).
"""

from __future__ import annotations

import argparse
import os

from splitserve.core.keys import write_keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write the keys into (created; must not hold keys already, unless only "
                               "--worker keys are added)")
    p.add_argument("--worker", action="append", default=[], metavar="ID",
                   help="also write a key pair for this worker id (repeatable); the router binds the id to it")


def main(args: argparse.Namespace) -> int:
    exists = os.path.exists(os.path.join(args.dir, "router.key_secret"))
    if exists and not args.worker:
        print(f"splitserve keys: {args.dir} already holds keys; refusing to overwrite them")
        return 2
    os.makedirs(args.dir, exist_ok=True)
    try:
        write_keys(args.dir, tuple(args.worker), shared=not exists)
    except ValueError as exc:
        print(f"splitserve keys: {exc}")
        return 2
    what = ([] if exists else ["router and shared worker keys"]) + ([f"keys for {', '.join(args.worker)}"]
                                                                     if args.worker else [])
    print(f"wrote {' and '.join(what)} into {args.dir}; start every process with --keys-dir {args.dir}")
    return 0
