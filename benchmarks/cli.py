"""``splitserve bench SUBCOMMAND``: each benchmark is a module with ``add_arguments`` and ``main``.

Benchmark modules keep their top-level imports light (torch is imported inside ``main``), so that
building this parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
from types import MappingProxyType
from typing import Mapping

BENCHES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "transfer": ("splitserve.benchmarks.transfer", "move one request's KV pages between two processes"),
    "serve": ("splitserve.benchmarks.serve", "load-test any OpenAI-compatible server"),
    "profile": ("splitserve.benchmarks.profile", "measure prefill/decode profiles for the planner"),
    "soak": ("splitserve.benchmarks.soak", "fixed-time seeded load; checks errors, KV pages and RSS after it"),
    "grammar": ("splitserve.benchmarks.bench_grammar", "structured output: the grammar mask's cost per decode step"),
    "agent": ("splitserve.benchmarks.agent", "multi-turn agent sessions: later-turn TTFT and prefill work, on vs off"),
})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH")
    sub.required = True
    for name, (module, help_text) in BENCHES.items():
        p = sub.add_parser(name, help=help_text, formatter_class=parser.formatter_class)  # the CLI's defaults help
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue  # benchmark not written yet
        p.set_defaults(_bench_module=module)


def main(args: argparse.Namespace) -> int:
    return int(importlib.import_module(args._bench_module).main(args) or 0)
