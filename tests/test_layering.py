"""Imports point one way: splitserve (CLI) -> roles (prefill, decode, router) -> transfer -> core -> kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RANK = {"splitserve": 4, "benchmarks": 4, "prefill": 3, "decode": 3, "router": 3, "transfer": 2, "core": 1, "kernels": 0}
SUBPACKAGE = {"splitserve": "splitserve", "benchmarks": "splitserve.benchmarks", "prefill": "splitserve.prefill",
              "decode": "splitserve.decode", "router": "splitserve.router", "transfer": "splitserve.transfer",
              "core": "splitserve.core", "kernels": "splitserve.kernels"}


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def layer_of(module: str) -> str | None:
    best = None
    for folder, pkg in SUBPACKAGE.items():
        if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(SUBPACKAGE[best])):
            best = folder
    return best


@pytest.mark.parametrize("folder", sorted(RANK))
def test_imports_point_down(folder):
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for mod in imported_modules(path):
            target = layer_of(mod)
            if target is None or target == folder:
                continue
            upward = RANK[target] > RANK[folder]
            sideways = RANK[target] == RANK[folder] and {folder, target} != {"splitserve", "benchmarks"}
            if upward or sideways:
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
            if folder == "router" and mod.split(".")[0] == "torch":
                bad.append(f"{path.relative_to(REPO)} imports torch")
    assert not bad, "\n".join(bad)
