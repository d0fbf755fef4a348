"""``splitserve keys DIR``: write a CurveZMQ key set for a deployment (core/keys.py says who holds which key).

1. A router and a worker certificate go into DIR (secret files mode 0600), their public halves into DIR/public.
2. Give every process ``--keys-dir DIR`` (or ``SPLITSERVE_KEYS_DIR``; in containers, mount DIR as a secret): the
   router's control socket, the workers' peer sockets and their KV receivers then accept only those keys.
"""

from __future__ import annotations

import argparse
import os

from splitserve.core.keys import write_keys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write the keys into (created; must not hold keys already)")


def main(args: argparse.Namespace) -> int:
    if os.path.exists(os.path.join(args.dir, "router.key_secret")):
        print(f"splitserve keys: {args.dir} already holds keys; refusing to overwrite them")
        return 2
    os.makedirs(args.dir, exist_ok=True)
    write_keys(args.dir)
    print(f"wrote router and worker keys into {args.dir}; start every process with --keys-dir {args.dir}")
    return 0
