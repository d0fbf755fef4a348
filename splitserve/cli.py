"""The ``splitserve`` command. Each subcommand lives in its own module, imported only when used,
so ``splitserve router --help`` never imports torch.

A subcommand module provides ``add_arguments(parser)`` and ``main(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from types import MappingProxyType
from typing import Mapping

from splitserve.router.version import package_version

COMMANDS: Mapping[str, tuple[str, str]] = MappingProxyType({
    "up": ("splitserve.launcher", "start a router plus prefill and decode workers on this machine"),
    "generate": ("splitserve.generate", "offline generation in one process"),
    "router": ("splitserve.router.main", "run the HTTP router (OpenAI-compatible API)"),
    "prefill": ("splitserve.worker", "run a prefill worker"),
    "decode": ("splitserve.worker", "run a decode worker"),
    "worker": ("splitserve.worker", "run a worker of any role (--role prefill|decode|both; both = colocated)"),
    "bench": ("splitserve.benchmarks.cli", "benchmarks: transfer, serve, kernels, profile"),
    "plan": ("splitserve.router.planner_cli", "recommend a prefill:decode ratio for a workload and SLO"),
    "keys": ("splitserve.keys", "write CurveZMQ keys that authenticate the control plane (--keys-dir)"),
})


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each option with its default: argparse's value where the flag holds one; flags whose default
    comes from a config or an environment variable (value ``None`` here) say it in their own help text."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        unset = action.default is None or action.default is argparse.SUPPRESS or action.default is False
        if not text or "default" in text or action.nargs == 0 or unset:
            return text
        return f"{text} (default: %(default)s)"


def _global_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="splitserve", description="Disaggregated prefill/decode LLM serving", add_help=add_help,
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--version", action="version", version=f"splitserve {package_version()}",
                        help="print the version and exit")
    return parser


def _wanted_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (global options and their values skipped)."""
    probe = _global_parser(add_help=False)
    probe.add_argument("command", nargs="?")
    known, _ = probe.parse_known_args(argv)
    return known.command


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _global_parser()
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = _wanted_command(argv)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=DefaultsFormatter)
        if name == wanted:  # import only the module that runs
            importlib.import_module(module).add_arguments(p)
            p.set_defaults(_module=module, _command=name)
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.log_level)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
