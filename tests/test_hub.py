"""``--model owner/name``: a Hugging Face repo id resolved through the local cache (HF_HUB_OFFLINE), on every command
that loads a model; unknown ids end with a clear message and exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from splitserve.core.config import RouterConfig
from splitserve.core.hub import ModelNotFound, resolve_model
from splitserve.router.main import with_model_resolved

REPO = "splitserve-test/stories260K"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    """A Hugging Face hub cache holding stories260K as ``REPO`` (the layout huggingface_hub writes)."""
    from conftest import shared_model_path

    src = shared_model_path("stories260K")
    root = tmp_path_factory.mktemp("hub")
    repo_dir = root / ("models--" + REPO.replace("/", "--"))
    snap = repo_dir / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in os.listdir(src):
        (snap / f).symlink_to(os.path.join(src, f))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0123456789abcdef")
    return str(root), str(snap)


@pytest.fixture()
def offline(hf_cache, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_CACHE", hf_cache[0])  # for the subprocesses
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hf_cache[0])  # read at import in this process
    return hf_cache


def test_repo_id_resolves_to_the_cached_snapshot(offline):
    assert os.path.samefile(resolve_model(REPO), offline[1])
    assert resolve_model("builtin:tiny-random-llama") == "builtin:tiny-random-llama"


@pytest.mark.parametrize("name, says", [("nobody/missing-model", "HF_HUB_OFFLINE"),
                                        ("./no/such/dir", "no such model directory"),
                                        ("not a model", "no such model directory")])
def test_unknown_models_are_named_in_the_error(offline, name, says):
    with pytest.raises(ModelNotFound, match=says):
        resolve_model(name)


def test_router_serves_the_repo_id_and_loads_the_snapshot(offline):
    cfg = with_model_resolved(RouterConfig(model=REPO))
    assert cfg.served_model_name == (REPO,) and os.path.samefile(cfg.model, offline[1])
    named = with_model_resolved(RouterConfig(model=REPO, served_model_name=("tiny",)))
    assert named.served_model_name == ("tiny",)


def _generate(model: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitserve.cli", "generate", "--model", model, "--prompt",
                           "Once upon a time", "--max-tokens", "12", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)


def test_generate_and_up_take_a_repo_id(offline):
    env = dict(os.environ)
    by_id, by_dir = _generate(REPO, env), _generate(offline[1], env)
    assert by_id.returncode == 0, by_id.stderr
    assert json.loads(by_id.stdout)["token_ids"] == json.loads(by_dir.stdout)["token_ids"]
    missing = _generate("nobody/missing-model", env)
    assert missing.returncode == 2 and "nobody/missing-model" in missing.stderr and "Traceback" not in missing.stderr
    up = subprocess.run([sys.executable, "-m", "splitserve.cli", "up", "--model", "nobody/missing-model"],
                        capture_output=True, text=True, timeout=60, env=env)
    assert up.returncode == 2 and "not found in the local Hugging Face cache" in up.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without GPUs")
def test_up_on_cuda_without_a_gpu_says_so_before_starting_anything():
    up = subprocess.run([sys.executable, "-m", "splitserve.cli", "up", "--device", "cuda"],
                        capture_output=True, text=True, timeout=60)
    assert up.returncode == 2 and "--device cuda" in up.stderr and "no CUDA device" in up.stderr
    assert "starting router" not in up.stderr and "Traceback" not in up.stderr
