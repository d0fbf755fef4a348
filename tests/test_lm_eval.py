"""lm-eval against the real stack: ``local-completions`` in tokenized mode (prompts as token-id lists, echoed prompt
logprobs) on a small local multiple-choice task gives the same loglikelihoods as lm-eval's ``hf`` model on the same
weights (stories260K), within 1e-4. No downloads: the task reads a local JSONL file."""

from __future__ import annotations

import json

import pytest

from conftest import shared_model_path

lm_eval = pytest.importorskip("lm_eval")

DOCS = [
    {"context": "Once upon a time, there was a little girl named", "choices": [" Lily", " Tom", " a dog"], "label": 0},
    {"context": "The cat sat on the", "choices": [" mat.", " tree.", " moon."], "label": 0},
    {"context": "One day, Tim went to the park to play with his", "choices": [" ball", " friends", " mom"], "label": 1},
    {"context": "She was very happy and said,", "choices": [" \"Thank you!\"", " \"No.\"", " nothing"], "label": 0},
    {"context": "Lily and Ben liked to", "choices": [" play", " eat cake", " sleep in the sun"], "label": 0},
]


def _task_dir(tmp_path) -> str:
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "splitserve_tiny.yaml").write_text(
        "task: splitserve_tiny\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "target_delimiter: ''\n"
        "metric_list:\n  - metric: acc\n"
    )
    return str(tmp_path)


def _loglikelihoods(model: str, model_args: str, tasks_dir: str) -> list[float]:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=["splitserve_tiny"], log_samples=True,
                          task_manager=TaskManager(include_path=tasks_dir, include_defaults=False))
    samples = sorted(out["samples"]["splitserve_tiny"], key=lambda s: s["doc_id"])
    return [float(resp[0][0]) for s in samples for resp in s["resps"]]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from cluster import Cluster

    c = Cluster(log_dir=tmp_path_factory.mktemp("lm-eval"), model=str(shared_model_path("stories260K")),
                worker_args=["--page-size", "8", "--num-pages", "256"]).start()
    yield c
    c.stop()


def test_local_completions_loglikelihoods_equal_the_hf_model(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = str(shared_model_path("stories260K"))
    tasks = _task_dir(tmp_path)
    ours = _loglikelihoods(
        "local-completions",
        f"base_url={stack.url}/v1/completions,model={model_dir},tokenizer={model_dir},tokenizer_backend=huggingface,"
        "tokenized_requests=True,add_bos_token=True,num_concurrent=1,max_retries=1",
        tasks)
    reference = _loglikelihoods("hf", f"pretrained={model_dir},dtype=float32,device=cpu,add_bos_token=True", tasks)
    assert len(ours) == len(reference) == sum(len(d["choices"]) for d in DOCS)
    assert max(abs(a - b) for a, b in zip(ours, reference)) < 1e-4, list(zip(ours, reference))
