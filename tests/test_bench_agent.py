"""``splitserve bench agent`` (issue 11): the trace is a pure function of the seed, pauses are heavy-tailed, and a
``--compare`` run against a real cluster (TinyStories-656K, CPU, tiny pauses) finds every turn's greedy text equal
with sessions on and off, and reads the server's prefill and session counters. ``--token-ids`` (prompts of random
token ids, generated ids appended) does the same against stories260K, comparing id lists."""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import replace

import pytest

from conftest import shared_model_path
from splitserve.benchmarks import agent
from splitserve.benchmarks.agent import AgentConfig, TurnResult, build_script, compare_texts, draw_pause, salt_for
from test_e2e import start_cluster


def test_the_script_depends_on_the_seed_and_salt_only_and_grows_each_turn():
    cfg = AgentConfig(base_url="http://unused", sessions=3, turns=4, pause_scale=2.0)
    one, again = build_script(cfg, salt_for(0, "on")), build_script(cfg, salt_for(0, "on"))
    assert [vars(s) for s in one] == [vars(s) for s in again]
    other = build_script(cfg, salt_for(0, "off"))
    assert other[0].opening != one[0].opening and other[0].turn_texts == one[0].turn_texts
    shared = one[0].opening.split(" Once upon a time")[0]
    assert all(s.opening.startswith(shared) for s in one) and len({s.session_id for s in one}) == 3
    assert all(len(s.turn_texts) == 4 and s.turn_texts[0] == "" and all(s.turn_texts[1:]) for s in one)
    assert all(len(s.pauses) == 4 and s.pauses[-1] == 0.0 for s in one)


@pytest.mark.parametrize("dist,shape", [("lognormal", 1.5), ("pareto", 1.2)])
def test_pauses_are_heavy_tailed_and_capped(dist, shape):
    cfg = AgentConfig(base_url="http://unused", pause_dist=dist, pause_scale=1.0, pause_shape=shape, max_pause_s=120.0)
    rng = random.Random(7)
    pauses = [draw_pause(rng, cfg) for _ in range(2000)]
    median = statistics.median(pauses)
    assert 0.5 < median < 2.0 and max(pauses) <= 120.0
    assert sum(p > 10 * median for p in pauses) >= 20  # a few long ones: at least 1 % ten times the median
    assert draw_pause(rng, AgentConfig(base_url="http://unused", pause_scale=0.0)) == 0.0


def test_compare_names_every_turn_that_differs_or_failed():
    a = [TurnResult("s", 1, "p", ok=True, text="x"), TurnResult("s", 2, "p", ok=True, text="y"),
         TurnResult("t", 1, "p", ok=True, text="z")]
    b = [TurnResult("s", 1, "p", ok=True, text="x"), TurnResult("s", 2, "p", ok=True, text="Y")]
    assert compare_texts(a, b) == ["s/2", "t/1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "bench-agent", model=str(shared_model_path("TinyStories-656K")),
                      worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"])
    yield c
    c.stop()


def test_bench_agent_compare_against_a_real_cluster(cluster, capsys):
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    args = parser.parse_args(["--url", cluster.url, "--sessions", "3", "--turns", "3", "--pause-scale", "0.02",
                              "--max-pause-s", "0.5", "--hints", "--compare", "--json"])
    assert agent.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs_match"] is True and report["mismatches"] == []
    on, off = report["sessions_on"], report["sessions_off"]
    assert on["turns_ok"] == off["turns_ok"] == 9 and on["turns_failed"] == off["turns_failed"] == 0
    assert on["ttft_turn1_ms"]["p50"] is not None and on["ttft_later_ms"]["p50"] is not None
    assert on["server"]["session_hits"] == 6 and on["server"]["session_tokens_reused"] > 0
    assert off["server"]["session_hits"] == 0 and on["server"]["prefill_tokens"] > 0
    assert report["speedup"]["prefill_tokens_x"] is not None
    used = cluster.wait_pages_free()
    assert used and not any(used.values()), used  # every session's last turn ended it


def test_the_token_script_draws_ids_in_range_from_the_seed_and_salt():
    cfg = AgentConfig(base_url="http://unused", sessions=2, turns=3, token_ids=True, shared_tokens=20, turn_tokens=5,
                      id_low=10, vocab_size=50)
    one, again = build_script(cfg, salt_for(0, "on")), build_script(cfg, salt_for(0, "on"))
    assert [vars(s) for s in one] == [vars(s) for s in again]
    other = build_script(cfg, salt_for(0, "off"))
    assert other[0].opening[:20] != one[0].opening[:20] and other[0].turn_texts == one[0].turn_texts
    assert all(s.opening[:20] == one[0].opening[:20] and len(s.opening) == 25 for s in one)
    assert one[0].opening[20:] != one[1].opening[20:]
    assert all(s.turn_texts[0] == [] and all(len(t) == 5 for t in s.turn_texts[1:]) for s in one)
    assert all(10 <= i < 50 for s in one for t in [s.opening, *s.turn_texts] for i in t)
    own = build_script(replace(cfg, own_tokens=7), salt_for(0, "on"))  # each session's own context after the shared
    assert all(s.opening[:20] == one[0].opening[:20] and len(s.opening) == 32 for s in own)
    assert own[0].opening[20:27] != own[1].opening[20:27] and [s.opening[27:] for s in own] == [s.opening[20:] for s in one]
    assert build_script(replace(cfg, own_tokens=7), salt_for(0, "off"))[0].opening[20:27] != own[0].opening[20:27]


def test_compare_token_ids_compares_the_generated_ids():
    a = [TurnResult("s", 1, [5], ok=True, text="x", token_ids=[1, 2]), TurnResult("s", 2, [5], ok=True, token_ids=[3])]
    b = [TurnResult("s", 1, [5], ok=True, text="y", token_ids=[1, 2]), TurnResult("s", 2, [5], ok=True, token_ids=[4])]
    assert compare_texts(a, b, token_ids=True) == ["s/2"] and compare_texts(a, b) == ["s/1"]


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory):
    c = start_cluster(tmp_path_factory, "bench-agent-ids", model=str(shared_model_path("stories260K")),
                      worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"])
    yield c
    c.stop()


def test_bench_agent_token_ids_compare_against_a_real_cluster(small_cluster, capsys, monkeypatch):
    compared = []

    def spy(a, b, token_ids=False):
        compared.append((a, token_ids))
        return compare_texts(a, b, token_ids)

    monkeypatch.setattr(agent, "compare_texts", spy)
    parser = argparse.ArgumentParser()
    agent.add_arguments(parser)
    args = parser.parse_args(["--url", small_cluster.url, "--token-ids", "--vocab-size", "512", "--shared-tokens", "48",
                              "--turn-tokens", "8", "--max-tokens", "8", "--sessions", "2", "--turns", "3",
                              "--pause-scale", "0.02", "--max-pause-s", "0.2", "--hints", "--compare", "--json",
                              "--client-procs", "2", "--server-log", str(small_cluster.log_dir / "router.log")])
    assert agent.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs_match"] is True and report["mismatches"] == []
    assert report["config"]["token_ids"] is True and report["config"]["vocab_size"] == 512
    on, off = report["sessions_on"], report["sessions_off"]
    assert on["turns_ok"] == off["turns_ok"] == 6 and on["turns_failed"] == off["turns_failed"] == 0
    assert on["server"]["session_hits"] > 0 and on["server"]["session_tokens_reused"] > 0
    assert off["server"]["session_hits"] == 0
    for run in (on, off):  # every turn's router-side TTFT found by its response id (two client processes ran them)
        assert run["server_ttft_turns"] == 6 and 0 < run["server_ttft_later_ms"]["p50"] <= run["ttft_later_ms"]["p50"]
    (results, token_ids), = compared
    assert token_ids and len(results) == 6 and all(len(r.token_ids) == 8 for r in results)
    by_turn = {(r.session_id, r.turn): r for r in results}
    for r in results:  # each turn's prompt: the last one, the ids it generated, then 8 new ids
        if r.turn > 1:
            last = by_turn[(r.session_id, r.turn - 1)]
            assert r.prompt[:len(last.prompt) + 8] == last.prompt + last.token_ids
            assert len(r.prompt) == len(last.prompt) + 16
        assert r.prompt_tokens == len(r.prompt) and 0 <= r.cached_tokens <= r.prompt_tokens  # the stream's usage
    later = [r for r in results if r.turn > 1]  # the sessions-on run's later turns
    assert off["computed_later"]["turns"] == on["computed_later"]["turns"] == 4
    assert on["computed_later"]["prompt_tokens"] == sum(len(r.prompt) for r in later)
    # each later turn computes its 8 new ids and the last generated one (its KV was never computed): the held
    # session gives everything else, its partial last page included
    assert on["computed_later"]["computed_tokens"] == 4 * 9
    assert report["speedup"]["computed_later_x"] is not None
    used = small_cluster.wait_pages_free()
    assert used and not any(used.values()), used
