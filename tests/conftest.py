"""Shared test helpers: where the real test models live."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models on 2 shared cores: one intra-op thread per process is several times faster than two
# threads contending (measured 0.37 s vs 2.5 s for 32 tokens of stories260K while other tests ran).
# Set before torch is imported anywhere; worker subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402  (after the thread settings above)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run in the interpreter on CPU

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path:
    """``<repo root>/../shared`` unless ``SPLITSERVE_SHARED_DIR`` says otherwise."""
    return Path(os.environ.get("SPLITSERVE_SHARED_DIR", REPO_ROOT.parent / "shared"))


def shared_model_path(name: str) -> Path:
    """Path of a model under ``shared/models``; fails the test clearly if it is absent."""
    path = shared_dir() / "models" / name
    if not (path / "config.json").is_file():
        pytest.fail(f"shared model {name} not found at {path} (set SPLITSERVE_SHARED_DIR)")
    return path


@pytest.fixture
def shared_models():
    """``shared_models("stories260K")`` -> Path of that model directory."""
    return shared_model_path
