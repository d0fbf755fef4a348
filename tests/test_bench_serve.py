"""``splitserve bench serve``: pure parts (arrivals, datasets, metrics) and an end-to-end run against a
small OpenAI-compatible aiohttp server started here (bench serve must measure any such server; the
run against the real SplitServe stack lives with the serving tests)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import statistics
import threading

import numpy as np
import pytest

from splitserve.benchmarks import serve
from splitserve.benchmarks.serve import (
    DatasetSpec,
    RequestResult,
    arrival_offsets,
    build_dataset,
    latency_stats_ms,
    meets_slo,
    percentile,
    summarize,
)
from splitserve.cli import build_parser


# ---------------------------------------------------------------------------------------------- arrivals


def test_rate_inf_sends_everything_at_once():
    assert arrival_offsets(5, math.inf, rng=random.Random(0)) == [0.0] * 5


def test_fixed_rate_is_evenly_spaced():
    offs = arrival_offsets(5, 4.0, fixed=True, rng=random.Random(0))
    assert offs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_requested_mean_rate_and_spread(burstiness):
    offs = arrival_offsets(20001, 10.0, burstiness=burstiness, rng=random.Random(1))
    gaps = np.diff(offs)
    assert offs[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    # gamma(k, theta): coefficient of variation 1/sqrt(k); Poisson (k=1) has CV 1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0 / math.sqrt(burstiness), rel=0.07)


def test_arrivals_are_reproducible_and_validated():
    a = arrival_offsets(10, 3.0, rng=random.Random(7))
    assert a == arrival_offsets(10, 3.0, rng=random.Random(7))
    assert a != arrival_offsets(10, 3.0, rng=random.Random(8))
    for bad in (dict(num=3, rate=0.0), dict(num=3, rate=-1.0), dict(num=-1, rate=1.0)):
        with pytest.raises(ValueError):
            arrival_offsets(bad["num"], bad["rate"], rng=random.Random(0))
    with pytest.raises(ValueError):
        arrival_offsets(3, 1.0, burstiness=0.0, rng=random.Random(0))


# ---------------------------------------------------------------------------------------------- datasets


def test_random_dataset_lengths_and_id_range():
    spec = DatasetSpec("random", num_prompts=50, input_len=100, output_len=20, range_ratio=0.5)
    prompts = build_dataset(spec, random.Random(0), vocab_size=50)
    for p in prompts:
        assert 50 <= p.prompt_len <= 150 and len(p.prompt) == p.prompt_len
        assert 10 <= p.output_len <= 30
        assert all(1 <= t < 50 for t in p.prompt)
    assert len({p.prompt_len for p in prompts}) > 5  # lengths actually vary


def test_prefix_dataset_shares_prefixes_and_has_unique_suffixes():
    spec = DatasetSpec("prefix", num_prompts=6, input_len=40, output_len=4, prefix_len=30, num_prefixes=2)
    prompts = build_dataset(spec, random.Random(0), vocab_size=1000)
    heads = [tuple(p.prompt[:30]) for p in prompts]
    assert heads[0] == heads[2] == heads[4] and heads[1] == heads[3] == heads[5] and heads[0] != heads[1]
    assert len({tuple(p.prompt[30:]) for p in prompts}) == 6
    assert all(p.prompt_len == 40 for p in prompts)
    with pytest.raises(ValueError):
        build_dataset(DatasetSpec("prefix", 2, 40, 4, prefix_len=40), random.Random(0), 1000)


class WordCodec:
    """A tokenizer whose round trip is lossy in the way real ones are: id 5 decodes to two words."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" t5 t5" if i == 5 else "" if i == 0 else f" t{i}" for i in ids)

    def encode(self, text, add_special_tokens=True):
        return [int(w[1:]) if w != "t5" else 6 for w in text.split()]


def test_dataset_text_prompts_retokenize_to_the_requested_length():
    spec = DatasetSpec("random", num_prompts=20, input_len=12, output_len=2)
    prompts = build_dataset(spec, random.Random(0), 8, tokenizer=WordCodec())  # ids 1..7: many 5s
    for p in prompts:
        assert isinstance(p.prompt, str)
        assert len(WordCodec().encode(p.prompt)) == p.prompt_len == 12
    with pytest.raises(ValueError):
        build_dataset(DatasetSpec("sharegpt", 1, 5, 2), random.Random(0), 100)


def test_dataset_with_the_builtin_tokenizer():
    from splitserve.core.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:tiny-random-llama")
    spec = DatasetSpec("prefix", num_prompts=4, input_len=48, output_len=2, prefix_len=32, num_prefixes=1)
    prompts = build_dataset(spec, random.Random(0), tok.vocab_size, tokenizer=tok)
    assert len({p.prompt[:20] for p in prompts}) == 1 and len({p.prompt for p in prompts}) == 4
    for p in prompts:
        n = len(tok.encode(p.prompt, add_special_tokens=False))
        assert abs(n - p.prompt_len) <= 2 and abs(p.prompt_len - 48) <= 4  # boundary merges only


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q):
    vals = random.Random(q).sample(range(1000), 37)
    assert percentile(vals, q) == pytest.approx(float(np.percentile(vals, q)))


def test_percentile_rejects_bad_input():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def _result(i, ttft, e2e, tokens, ok=True, error=""):
    return RequestResult(f"r{i}", prompt_len=10, ok=ok, output_tokens=tokens, ttft_s=ttft,
                         itl_s=[(e2e - ttft) / max(1, tokens - 1)] * (tokens - 1), e2e_s=e2e, error=error)


def test_tpot_and_slo_checks():
    r = _result(0, 0.2, 1.2, 11)
    assert r.tpot_s == pytest.approx(0.1)
    assert meets_slo(r, 0.2, 0.1) and not meets_slo(r, 0.19, None) and not meets_slo(r, None, 0.09)
    one = _result(1, 0.2, 0.2, 1)
    assert one.tpot_s is None and meets_slo(one, 0.5, 0.001)  # no TPOT to miss
    assert not meets_slo(_result(2, 0.1, 0.2, 3, ok=False), None, None)


def test_summarize_throughput_percentiles_goodput_and_failures():
    results = [_result(i, 0.1 * (i + 1), 0.1 * (i + 1) + 1.0, 11) for i in range(10)]  # TPOT 0.1 each
    results[9].itl_s = [0.05, 0.15] * 5
    results.append(_result(10, 0.0, 0.0, 0, ok=False, error="HTTP 503: busy"))
    s = summarize(results, 4.0, slo_ttft_s=0.5, slo_tpot_s=0.1)
    assert (s["completed"], s["failed"], s["errors"]) == (10, 1, {"HTTP 503: busy": 1})
    assert s["request_throughput"] == pytest.approx(2.5)
    assert s["output_throughput"] == pytest.approx(110 / 4.0)
    assert s["total_token_throughput"] == pytest.approx(210 / 4.0)
    ttfts = [0.1 * (i + 1) * 1000 for i in range(10)]
    assert s["ttft_ms"]["mean"] == pytest.approx(statistics.mean(ttfts))
    assert s["ttft_ms"]["p90"] == pytest.approx(float(np.percentile(ttfts, 90)))
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0)
    assert s["itl_ms"]["p99"] > 100.0  # the uneven request shows in ITL, not in TPOT
    assert s["goodput"] == pytest.approx(5 / 4.0)  # TTFT 0.1 .. 0.5 meet the 0.5 s SLO
    assert s["slo_attainment"] == pytest.approx(5 / 11)
    swept = summarize(results, 4.0, slo_ttft_s=0.5, slo_tpot_s=0.1, tpot_sweep_s=(0.05, 0.1))
    assert swept["attainment_by_tpot_ms"] == {"50": 0.0, "100": pytest.approx(5 / 11)}  # every TPOT is 0.1 s
    no_slo = summarize(results, 4.0)
    assert no_slo["goodput"] is None and no_slo["slo"] == {"ttft_ms": None, "tpot_ms": None}
    assert latency_stats_ms([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


# ---------------------------------------------------------------------------------------------- end to end


STUB_MODEL = "stub-model"
FAIL_TOKEN = 7  # a prompt starting with this id is refused, so failures are exercised


def _stub_app():
    from aiohttp import web

    async def models(_request):
        return web.json_response({"object": "list", "data": [{"id": STUB_MODEL, "object": "model"}]})

    async def completions(request):
        body = await request.json()
        prompt, n = body["prompt"], body["max_tokens"]
        if body.get("model") != STUB_MODEL or not body.get("stream") or not body.get("ignore_eos"):
            return web.json_response({"error": {"message": "bad request", "type": "invalid_request_error"}}, status=400)
        if isinstance(prompt, list) and prompt and prompt[0] == FAIL_TOKEN:
            return web.json_response({"error": {"message": "refused", "type": "server_error"}}, status=503)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await asyncio.sleep(0.002)
            chunk = {"choices": [{"index": 0, "text": f" w{i}", "finish_reason": "length" if i == n - 1 else None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    return app


@pytest.fixture()
def stub_url():
    """An OpenAI-compatible streaming server on a free loopback port, in its own thread and loop."""
    from aiohttp import web

    loop = asyncio.new_event_loop()
    runner = web.AppRunner(_stub_app())
    loop.run_until_complete(runner.setup())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def _run_cli(argv, capsys):
    args = build_parser(argv).parse_args(argv)
    rc = serve.main(args)
    return rc, capsys.readouterr().out


def test_bench_serve_end_to_end_against_stub(stub_url, capsys):
    argv = ["bench", "serve", "--url", stub_url, "--dataset", "random", "--input-len", "16", "--output-len", "5",
            "--num-prompts", "12", "--request-rate", "200", "--max-concurrency", "4",
            "--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000", "--seed", "3", "--json"]
    rc, out = _run_cli(argv, capsys)
    report = json.loads(out)
    assert rc == 0 and report["model"] == STUB_MODEL
    assert (report["completed"], report["failed"]) == (12, 0)
    assert report["output_tokens"] == 12 * 5 and report["input_tokens"] == 12 * 16
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        row = report[key]
        assert 0 < row["p50"] <= row["p90"] <= row["p99"], key
    assert report["e2e_ms"]["p50"] > report["ttft_ms"]["p50"]
    assert report["goodput"] == pytest.approx(report["request_throughput"])  # generous SLO: all meet it


def test_bench_serve_counts_failures_and_prefix_dataset(stub_url, capsys, monkeypatch):
    real = serve.build_dataset

    def with_refused(spec, rng, vocab, tokenizer=None):
        prompts = real(spec, rng, vocab, tokenizer)
        bad = serve.Prompt([FAIL_TOKEN] + list(prompts[0].prompt[1:]), prompts[0].prompt_len, prompts[0].output_len)
        return [bad] + prompts[1:]

    monkeypatch.setattr(serve, "build_dataset", with_refused)  # a refusal cannot be provoked otherwise
    argv = ["bench", "serve", "--url", stub_url, "--model", STUB_MODEL, "--dataset", "prefix", "--input-len", "12",
            "--prefix-len", "8", "--output-len", "3", "--num-prompts", "5", "--request-rate", "inf",
            "--slo-ttft-ms", "0.000001"]
    rc, out = _run_cli(argv, capsys)
    assert rc == 0
    assert "completed 4  failed 1" in out and "HTTP 503" in out
    assert "goodput 0.000 req/s" in out  # nothing meets a 1 ns TTFT


def test_bench_serve_reports_unreachable_server_as_failures(capsys):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    argv = ["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--model", "m", "--input-len", "4",
            "--output-len", "2", "--num-prompts", "2", "--json"]
    rc, out = _run_cli(argv, capsys)
    report = json.loads(out)
    assert rc == 1 and report["failed"] == 2 and report["completed"] == 0
    assert report["request_rate"] is None  # inf is not JSON


def test_bench_profile_against_stub_feeds_the_planner(stub_url, capsys, tmp_path):
    from splitserve.benchmarks import profile as bench_profile
    from splitserve.router.planner import Profile

    out = tmp_path / "profile.json"
    argv = ["bench", "profile", "--url", stub_url, "--prefill-lens", "8,16", "--batch-sizes", "1,3",
            "--decode-output-len", "4", "--repeats", "2", "--out", str(out), "--json"]
    assert bench_profile.main(build_parser(argv).parse_args(argv)) == 0
    printed = json.loads(capsys.readouterr().out)
    prof = Profile.load(out)
    assert printed == json.loads(out.read_text())
    assert prof.prefill_lens == (8.0, 16.0) and prof.decode_batches == (1.0, 3.0)
    assert all(s > 0 for s in prof.prefill_s + prof.decode_s)
    argv = ["bench", "profile", "--load", str(out)]
    assert bench_profile.main(build_parser(argv).parse_args(argv)) == 0
    assert "decode batch" in capsys.readouterr().out
