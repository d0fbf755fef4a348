"""User config: frozen, unknown keys rejected, flags over SPLITSERVE_* variables over defaults."""

from __future__ import annotations

import argparse

import pydantic
import pytest

from splitserve.core.config import EngineConfig, RouterConfig, TransferConfig, WorkerConfig, env_overrides
from splitserve.worker import add_arguments, build_config


def decode_config(argv: list[str], environ: dict[str, str]) -> WorkerConfig:
    """``splitserve decode ARGV`` with ``environ`` as its environment: the config the worker would run."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(argv)
    args._command = "decode"
    return build_config(args, environ=environ)


def test_unknown_keys_are_rejected_and_configs_are_frozen():
    with pytest.raises(pydantic.ValidationError, match="page_sise"):
        EngineConfig.from_mapping({"page_sise": 32})
    with pytest.raises(pydantic.ValidationError):
        RouterConfig(port=-1)
    cfg = TransferConfig()
    with pytest.raises(pydantic.ValidationError):
        cfg.lease_s = 1.0  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        WorkerConfig(role="sideways")


def test_env_overrides_and_flags_precedence():
    assert env_overrides(environ={"SPLITSERVE_PAGE_SIZE": "32", "OTHER": "x"}) == {"page_size": "32"}
    env = {"SPLITSERVE_PAGE_SIZE": "32", "SPLITSERVE_MAX_NUM_SEQS": "7", "SPLITSERVE_FAILURE_POLICY": "fail"}
    argv = ["--page-size", "8", "--transfer", "zmq", "--lease-s", "3"]
    cfg = decode_config(argv, env)
    assert cfg.role == "decode"
    assert cfg.engine.page_size == 8  # the flag beats the variable
    assert cfg.engine.max_num_seqs == 7  # the variable beats the default
    assert cfg.transfer.lease_s == 3.0 and cfg.transfer.failure_policy == "fail"
    assert cfg.transfer.ucx_progress == "auto"
    cfg = decode_config(argv, {"SPLITSERVE_UCX_PROGRESS": "polling"})
    assert cfg.transfer.ucx_progress == "polling"
    assert decode_config(["--ucx-progress", "blocking"],
                         {"SPLITSERVE_UCX_PROGRESS": "polling"}).transfer.ucx_progress == "blocking"


def test_capture_mixed_graphs_from_the_flag_or_the_environment():
    def build(argv: list[str], env: dict[str, str]) -> bool | None:
        return decode_config(argv, env).engine.capture_mixed_graphs

    assert build([], {}) is None  # auto: by the worker's role (below)
    assert build(["--capture-mixed-graphs"], {}) is True
    assert build([], {"SPLITSERVE_CAPTURE_MIXED_GRAPHS": "1"}) is True
    assert build(["--no-capture-mixed-graphs"], {"SPLITSERVE_CAPTURE_MIXED_GRAPHS": "1"}) is False
    with pytest.raises(ValueError, match="maybe"):
        build([], {"SPLITSERVE_CAPTURE_MIXED_GRAPHS": "maybe"})


@pytest.mark.parametrize("chosen", [None, True, False])
@pytest.mark.parametrize("role", ["prefill", "decode", "both"])
def test_a_worker_captures_every_mixed_graph_when_asked_or_started_as_decode(role, chosen):
    cfg = WorkerConfig(role=role, engine=EngineConfig(capture_mixed_graphs=chosen))
    assert cfg.captures_mixed_graphs is (role == "decode" if chosen is None else chosen)


def test_transfer_host_follows_the_worker_host():
    assert decode_config(["--host", "decode-1"], {}).transfer.host == "decode-1"
    assert decode_config(["--host", "decode-1", "--transfer-host", "10.0.0.5"], {}).transfer.host == "10.0.0.5"


def test_served_model_names_split_at_commas_and_refuse_empty_names():
    import pydantic

    from splitserve.core.config import RouterConfig

    assert RouterConfig(served_model_name="a, b").served_model_name == ("a", "b")
    assert RouterConfig(served_model_name=["a", "b,c", "a"]).served_model_name == ("a", "b", "c")
    assert RouterConfig().served_model_name == ()
    with pytest.raises(pydantic.ValidationError, match="empty name"):
        RouterConfig(served_model_name="a,,b")
