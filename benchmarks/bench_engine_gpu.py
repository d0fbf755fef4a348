"""GPU engine benchmarks for issue 5 (run on a GPU machine; prints tables with card, date and ratios).

1. Decode step of a dummy-weight Llama-3-8B (bf16): time per step at batch 1/16/64/256 and context 1024/4096,
   against the roofline floor = (weight bytes + KV bytes read) / measured device copy bandwidth.
2. Prefill: tokens/s and MFU for 1, 4 and 16 prompts of 2048 tokens, against the measured bf16 matmul rate.
3. Engine decode loop (``--loop``): ``LLMEngine.step()`` at batch 16 / context 4096 and batch 64 / context 1024, with
   overlapped decode steps (``async_scheduling``) on and off, against the CUDA-graph step alone: what host work
   (scheduling, inputs, outputs) adds to a step and how much of it the overlap hides.
4. Correctness and offline generation against Hugging Face transformers on the same weights: greedy ids in bf16
   (first 16 tokens) and batch generation throughput.
5. A session turn's step (``--mixed``): a decode batch of ``--mixed-batch`` rows at ``--mixed-context`` (CUDA graph,
   and eager), the same batch with one more row prefilling ``q`` new tokens behind a cached prefix of the same
   context (eager: what a held session's turn costs the decode worker), and that row alone; then, in the engine
   loop with overlapped decode steps, the wall time from a turn's arrival (at a random point of a decode step) to
   its first token, the turn's prefix cached: its step run synchronously once the step in flight has completed (the
   baseline), queued behind the step in flight (``overlap_prefill``), queued with the step window
   (``step_window``: the loop waits for arrivals before launching the next decode step), and that in a step of its
   own ahead of the decode rows (``prefill_first_tokens``), in the same run, with the decode rows' longest gap between
   two tokens around each turn (what the turn costs them).
   ``--host-profile``: instead, the host time to schedule and launch a turn's step against a decode step's, and a
   profile of the turn's. ``--buckets``: instead, a turn's graph step in each prefill bucket (what padding costs).
   ``--profile-graphs``: instead, the kernels of a decode step's and a turn's step's graph replays, by device time.

Usage: python -m splitserve.benchmarks.bench_engine_gpu [--shape llama3-8b] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import random
import statistics
import time

import torch

from splitserve.benchmarks.agent import TURN_STEPS, TurnStep
from splitserve.core.config import EngineConfig
from splitserve.core.engine.batch import ScheduledBatch, SeqWork
from splitserve.core.engine.engine import LLMEngine, limits_for_role
from splitserve.core.messages import SamplingParams

GREEDY = SamplingParams(max_tokens=1, temperature=0.0)


def cuda_time(fn, iters: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a), iters=20)
    return 2 * a.numel() / t


def matmul_rate(dev: torch.device) -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    t = cuda_time(lambda: a @ b, iters=20)
    return 2 * 8192**3 / t


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_batch(batch: int, ctx: int, page_size: int, first_page: int) -> ScheduledBatch:
    pages_per_seq = (ctx + page_size - 1) // page_size
    seqs = []
    for b in range(batch):
        start = first_page + b * pages_per_seq
        seqs.append(SeqWork(request_id=f"d{b}", token_ids=(17 + b,), start_pos=ctx - 1,
                            page_table=tuple(range(start, start + pages_per_seq)), sample=True, params=GREEDY))
    return ScheduledBatch(seqs=tuple(seqs), page_size=page_size)


def prefill_batch(n: int, length: int, page_size: int, vocab: int) -> ScheduledBatch:
    pages = (length + page_size - 1) // page_size
    seqs = tuple(
        SeqWork(request_id=f"p{i}", token_ids=tuple((i * 7919 + j * 31) % (vocab - 3) + 3 for j in range(length)), start_pos=0,
                page_table=tuple(range(i * pages, (i + 1) * pages)), sample=True, params=GREEDY)
        for i in range(n)
    )
    return ScheduledBatch(seqs=seqs, page_size=page_size)


def bench_decode(engine: LLMEngine, bw: float, quick: bool) -> list[str]:
    mc, info = engine.model_config, engine.info
    kv_tok = mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * engine.kv_cache.element_size()
    wbytes = weight_bytes(engine.runner.model)
    rows = ["| batch | context | step ms (CUDA graph) | step ms (eager) | floor ms | graph step / floor | tokens/s |",
            "|---|---|---|---|---|---|---|"]
    graphs = engine.runner.graphs
    for batch in (1, 16, 64, 256):
        for ctx in (1024, 4096):
            if batch * ((ctx + info.page_size - 1) // info.page_size) > info.num_pages:
                rows.append(f"| {batch} | {ctx} | skipped: KV ({batch * ctx * kv_tok / 2**30:.0f} GiB) exceeds the pool | | | |")
                continue
            sb = decode_batch(batch, ctx, info.page_size, 0)
            engine.runner.graphs = None
            eager_tokens = [r.token_id for r in engine.runner.execute(sb).results]
            t_eager = cuda_time(lambda: engine.runner.execute(sb), iters=5 if quick else 20)
            engine.runner.graphs = graphs
            same = [r.token_id for r in engine.runner.execute(sb).results] == eager_tokens
            t = cuda_time(lambda: engine.runner.execute(sb), iters=5 if quick else 20)
            floor = (wbytes + batch * ctx * kv_tok) / bw
            rows.append(f"| {batch} | {ctx} | {t * 1e3:.2f}{'' if same else ' (MISMATCH vs eager)'} | "
                        f"{t_eager * 1e3:.2f} | {floor * 1e3:.2f} | {t / floor:.2f}x | {batch / t:.0f} |")
    return rows


def with_prefill_row(sb: ScheduledBatch, q: int, ctx: int, first_page: int, vocab: int) -> ScheduledBatch:
    """``sb`` plus one row computing ``q`` new tokens at positions ``ctx ..`` behind ``ctx`` cached tokens."""
    ps = sb.page_size
    pages = tuple(range(first_page, first_page + (ctx + q + ps - 1) // ps))
    row = SeqWork(request_id="turn", token_ids=tuple((j * 31 + 5) % (vocab - 3) + 3 for j in range(q)), start_pos=ctx,
                  page_table=pages, sample=True, params=GREEDY)
    return ScheduledBatch(seqs=(*sb.seqs, row), page_size=ps)


def decode_and_turn(engine: LLMEngine, batch: int, ctx: int, q: int) -> tuple[ScheduledBatch, ScheduledBatch]:
    """(``batch`` decode rows at ``ctx``, the same rows plus a turn row of ``q`` new tokens behind ``ctx`` cached
    ones, on the pages after theirs)."""
    ps = engine.info.page_size
    sb = decode_batch(batch, ctx, ps, 0)
    return sb, with_prefill_row(sb, q, ctx, batch * ((ctx + ps - 1) // ps), engine.model_config.vocab_size)


def bench_mixed_steps(engine: LLMEngine, batch: int, ctx: int, quick: bool,
                      qs: tuple[int, ...] = (16, 64, 256, 1024)) -> list[str]:
    """Runner step times: the decode batch (graph, eager), with a session turn's prefill row, that row alone."""
    ps, iters, graphs = engine.info.page_size, 5 if quick else 20, engine.runner.graphs

    def timed(step: ScheduledBatch, graphed: bool) -> float:
        engine.runner.graphs = graphs if graphed else None
        return cuda_time(lambda: engine.runner.execute(step), iters=iters) * 1e3

    sb = decode_batch(batch, ctx, ps, 0)
    t_graph = timed(sb, True)
    rows = ["| step | q new tokens | ms | vs decode step (graph) |", "|---|---:|---:|---:|",
            f"| {batch} decode rows, CUDA graph | - | {t_graph:.2f} | 1.00x |"]
    cases = [(f"{batch} decode rows", "-", sb)]
    for q in qs:
        mixed = decode_and_turn(engine, batch, ctx, q)[1]
        cases += [(f"{batch} decode rows + 1 turn row", q, mixed),
                  ("the turn row alone", q, ScheduledBatch(seqs=mixed.seqs[-1:], page_size=ps))]
    for label, q, step in cases:
        for graphed in ((False, True) if graphs is not None and graphs.key(step) is not None and q != "-" else (False,)):
            t = timed(step, graphed)
            rows.append(f"| {label} ({'CUDA graph' if graphed else 'eager'}) | {q} | {t:.2f} | {t / t_graph:.2f}x |")
    engine.runner.graphs = graphs
    return rows


def bench_prefill_buckets(engine: LLMEngine, ctx: int, q: int, quick: bool) -> list[str]:
    """What a mixed graph's padding costs: the graph step of 0, 12 and 24 decode rows plus one turn row of ``q`` new
    tokens (0: a prompt-only step, ``prefill_first_tokens``), its prefill bucket forced to each size of 80 to 160
    that holds ``q``, against the decode rows' own graph step."""
    graphs = engine.runner.graphs
    if graphs is None:
        return ["no CUDA graphs"]
    iters, default = 5 if quick else 20, graphs.prefill_buckets
    sizes = [size for size in (80, 96, 112, 128, 160) if size >= q]
    rows = ["| decode rows | turn q | prefill bucket | graph step ms | vs the decode rows' graph |",
            "|---:|---:|---:|---:|---:|"]
    for batch in (0, 12, 24):
        sb, mixed = decode_and_turn(engine, max(batch, 1), ctx, q)
        alone = cuda_time(lambda: engine.runner.execute(sb), iters=iters) * 1e3
        if not batch:  # the turn row alone: the 1-row decode step is the baseline
            mixed = ScheduledBatch(seqs=tuple(s for s in mixed.seqs if s.num_tokens > 1), page_size=mixed.page_size)
        rows.append(f"| {max(batch, 1)} | - | - | {alone:.2f} | 1.00x |")
        for size in sizes:
            graphs.prefill_buckets = (size, default[-1])
            t = cuda_time(lambda: engine.runner.execute(mixed), iters=iters) * 1e3
            rows.append(f"| {batch} | {q} | {size} | {t:.2f} | {t / alone:.2f}x |")
    graphs.prefill_buckets = default
    return rows


def profile_steps(engine: LLMEngine, batch: int, ctx: int, q: int) -> list[str]:
    """Where an eager step's time goes (torch profiler, 3 steps each, top ops by host time): the decode batch, a
    session turn's row alone, then both in one step by device time (the kernels a mixed-step graph replays)."""
    sb, turn = decode_and_turn(engine, batch, ctx, q)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    out = []
    for label, step, sort in ((f"{batch} decode rows, eager", sb, "self_cpu_time_total"),
                              (f"a turn row of {q} tokens alone, eager",
                               ScheduledBatch(seqs=turn.seqs[-1:], page_size=sb.page_size), "self_cpu_time_total"),
                              (f"{batch} decode rows + a turn row of {q} tokens, eager, by device time", turn,
                               "self_device_time_total")):
        out += [f"### {label}", "```", _torch_profile(engine, step, sort, 3, 22), "```"]
        out += ["Python functions by own time (cProfile, 3 steps):", "```", _python_profile(engine, step), "```"]
    engine.runner.graphs = graphs
    return out


def profile_graph_steps(engine: LLMEngine, batch: int, ctx: int, q: int) -> list[str]:
    """Where a CUDA graph step's device time goes (torch profiler, 5 replays each): the decode rows' graph, then the
    mixed graph with a turn row of ``q`` tokens (the kernels each replays, by device time)."""
    sb, turn = decode_and_turn(engine, batch, ctx, q)
    out = []
    for label, step in ((f"{batch} decode rows, CUDA graph", sb),
                        (f"{batch} decode rows + a turn row of {q} tokens, CUDA graph", turn)):
        out += [f"### {label}", "```", _torch_profile(engine, step, "self_device_time_total", 5, 25), "```"]
    return out


def _torch_profile(engine: LLMEngine, step: ScheduledBatch, sort: str, steps: int, rows: int) -> str:
    """torch profiler table (``rows`` rows, by ``sort``) of ``steps`` runner steps of ``step``, after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    cuda_time(lambda: engine.runner.execute(step), iters=2)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.runner.execute(step)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def _python_profile(engine: LLMEngine, step: ScheduledBatch) -> str:
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(3):
        engine.runner.execute(step)
    torch.cuda.synchronize()
    prof.disable()
    return _stats_text(prof, "tottime", 25)


def _stats_text(prof, sort: str, rows: int) -> str:
    """A cProfile's top ``rows`` functions by ``sort``, as text."""
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats(sort).print_stats(rows)
    return text.getvalue()


class _Arrival:
    """One turn arriving ``phase`` seconds after a step returned, seen by the engine loop as a worker sees its socket:
    read at the top of the loop (``due``), or, with the step window, inside the engine's wait (``__call__``)."""

    def __init__(self, engine: LLMEngine, rid: str, prompt: list[int], phase: float) -> None:
        self.engine, self.rid, self.prompt = engine, rid, prompt
        self.at = time.perf_counter() + phase
        self.added = False

    def _add(self) -> None:
        self.engine.add_request(self.rid, self.prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
        self.added = True

    def due(self) -> None:
        if not self.added and time.perf_counter() >= self.at:
            self._add()

    def __call__(self, timeout_s: float) -> bool:
        left = self.at - time.perf_counter()
        if self.added or left > timeout_s:
            time.sleep(max(0.0, timeout_s))
            return False
        time.sleep(max(0.0, left))
        self._add()
        return True


def bench_turn_latency(engine: LLMEngine, batch: int, ctx: int, q: int, turns: int, mode: str, salt: int) -> list[str]:
    """In the engine loop (overlapped decode steps): ``batch`` requests decoding at ``ctx``; every few steps a turn
    whose first ``ctx`` tokens are cached (a held session) arrives at a random point of a decode step; wall ms from
    its arrival to its first token, and the longest gap between two tokens of a decoding request from the turn's
    arrival to the step after its first token (what the turn costs the decode rows). ``mode``: a key of
    :data:`~splitserve.benchmarks.agent.TURN_STEPS`; ``salt`` keeps the turns' new tokens apart from other calls'
    (none of them is cached)."""
    step = TURN_STEPS[mode]
    prompt = _start_turn_loop(engine, batch, ctx, salt, step)
    vocab, watched = engine.model_config.vocab_size, f"bg{salt}-0"
    rng, waits, steps, gaps = random.Random(salt), [], [], []
    for t in range(turns):
        for _ in range(3):
            t0 = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - t0)
        rid = f"turn{salt}-{t}"
        new = [(t * 97 + j + salt * 7919) % (vocab - 3) + 3 for j in range(q)]
        turn = _Arrival(engine, rid, prompt + new, rng.uniform(0.0, statistics.median(steps)))
        seen, first = [turn.at], None
        while first is None or len(seen) < 3:
            turn.due()
            outs = engine.step(turn if step.step_window else None)
            now = time.perf_counter()
            if first is None and any(o.request_id == rid and o.new_token_ids for o in outs):
                first = now
            if any(o.request_id == watched and o.new_token_ids for o in outs) and now > turn.at:
                seen.append(now)
        waits.append(first - turn.at)
        gaps.append(max(b - a for a, b in zip(seen, seen[1:])))
    _stop_turn_loop(engine, batch, salt)
    return [f"| {mode} | {q} | {statistics.median(steps) * 1e3:.2f} | {statistics.median(waits) * 1e3:.2f} | "
            f"{statistics.quantiles(waits, n=10)[-1] * 1e3:.2f} | {statistics.median(gaps) * 1e3:.2f} |"]


HELD = "held-session"
"""The key the turns' prefix is pinned under, as a held agent session's pages are."""


def _start_turn_loop(engine: LLMEngine, batch: int, ctx: int, salt: int, step: TurnStep) -> list[int]:
    """``batch`` requests decoding at ``ctx`` in the engine loop, its turn step set to ``step``; returns the turns'
    prefix (``ctx`` ids, pinned under :data:`HELD` and cached)."""
    engine.cfg = engine.cfg.model_copy(update={
        "async_scheduling": True, "overlap_prefill": "on" if step.overlap_prefill else "off",
        "step_window": step.step_window, "prefill_first_tokens": step.prefill_first_tokens,
        "prompt_lane": step.prompt_lane, "capture_mixed_graphs": step.capture_mixed_graphs})
    engine.scheduler.limits = limits_for_role(engine.cfg, "decode")
    if step.prompt_lane and engine.runner.graphs is not None:  # no capture inside the timed turns
        engine.runner.lane().graphs.capture_prompt_steps()
    if step.capture_mixed_graphs and engine.runner.graphs is not None:
        engine.runner.graphs.capture_all(mixed=True)
    vocab = engine.model_config.vocab_size
    prompt = [(j * 31 + 7) % (vocab - 3) + 3 for j in range(ctx)]
    engine.add_request(HELD, prompt + [5], SamplingParams(max_tokens=1, temperature=0.0), session_key=HELD)
    while engine.has_unfinished():
        engine.step()
    long = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for b in range(batch):
        engine.add_request(f"bg{salt}-{b}", [(b * 7919 + j * 31) % (vocab - 3) + 3 for j in range(ctx - 1)], long)
    for _ in range(40):  # prefilled, decoding
        engine.step()
    return prompt


def _stop_turn_loop(engine: LLMEngine, batch: int, salt: int) -> None:
    for b in range(batch):
        engine.abort(f"bg{salt}-{b}")
    while engine.has_unfinished():
        engine.step()
    engine.release_session(HELD)


def bench_turn_host(engine: LLMEngine, batch: int, ctx: int, q: int, turns: int) -> list[str]:
    """Host time to schedule and launch a held session's turn's step (queued behind the step in flight), against a
    plain decode step's, in the engine loop (the engine's own stamps, no profiler); then where the turn's goes (cProfile
    of the ``step()`` calls that launch a turn, which inflates Python time: read the shares)."""
    import cProfile

    salt = 9000
    prompt = _start_turn_loop(engine, batch, ctx, salt, TURN_STEPS["queued"])
    vocab, prof = engine.model_config.vocab_size, cProfile.Profile()
    plain, turn_ms = [], []
    for t in range(2 * turns):
        for _ in range(3):
            engine.step()
            plain.append(engine.last_step.started - engine.last_step.scheduled)
        rid = f"host{t}"
        engine.add_request(rid, prompt + [(t * 97 + j) % (vocab - 3) + 3 for j in range(q)],
                           SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), continues=HELD)
        profiled = t >= turns  # the first half unprofiled: the engine's stamps
        if profiled:
            prof.enable()
        outs = engine.step()  # launches the turn's step
        if profiled:
            prof.disable()
        while not any(o.request_id == rid and o.new_token_ids for o in outs):
            outs = engine.step()
        if not profiled:  # the step that gave the turn's first token is the turn's
            turn_ms.append(engine.last_step.started - engine.last_step.scheduled)
    _stop_turn_loop(engine, batch, salt)
    return [f"scheduling + launching, median ms: plain decode step {statistics.median(plain) * 1e3:.3f}, "
            f"step with a {q}-token turn {statistics.median(turn_ms) * 1e3:.3f} ({turns} turns, {batch} rows at "
            f"context {ctx})", "", "cProfile of the step() calls that launched a turn:", "```", _stats_text(prof, "cumulative", 40), "```"]


def _loop_ms(engine: LLMEngine, batch: int, ctx: int, steps: int, overlap: bool) -> tuple[float, list[list[int]]]:
    """Milliseconds per ``engine.step()`` over ``steps`` decode steps of ``batch`` requests (prompts of ``ctx`` - 1
    tokens, prefilled first), and every request's output ids."""
    engine.cfg = engine.cfg.model_copy(update={"async_scheduling": overlap})
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    reqs = [engine.add_request(f"loop{overlap}-{b}", [(b * 7919 + j * 31) % (vocab - 3) + 3 for j in range(ctx - 1)],
                               params) for b in range(batch)]
    while any(r.num_known_tokens - r.num_prompt_tokens < 2 for r in reqs):  # prefilled, decoding
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    return ms, [list(r.output_token_ids) for r in reqs]


def bench_loop(engine: LLMEngine, quick: bool) -> list[str]:
    rows = ["| batch | context | runner step alone ms (graph, sampling, host sync) | engine step ms, overlap off | "
            "overlap on | off / on | same tokens |", "|---|---|---|---|---|---|---|"]
    steps = 30 if quick else 100
    if engine.runner.graphs is not None:
        engine.runner.graphs.capture_all()  # no capture inside a timed loop
    for batch, ctx in ((16, 4096), (64, 1024)):
        sb = decode_batch(batch, ctx, engine.info.page_size, 0)
        alone = cuda_time(lambda: engine.runner.execute(sb), iters=5 if quick else 20) * 1e3
        off, toks_off = _loop_ms(engine, batch, ctx, steps, False)
        on, toks_on = _loop_ms(engine, batch, ctx, steps, True)
        rows.append(f"| {batch} | {ctx} | {alone:.2f} | {off:.2f} | {on:.2f} | {off / on:.2f}x | {toks_on == toks_off} |")
    return rows


def model_flops(mc, tokens: int, length: int, n: int) -> float:
    """Matmul FLOPs of a prefill: 2 * params-in-matmuls * tokens + causal attention (QK and PV)."""
    h, q, kv, inter = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * inter
    dense = 2 * tokens * (mc.num_layers * per_layer + h * mc.vocab_size / length)  # logits only for last tokens
    attn = n * mc.num_layers * 2 * 2 * (length * length / 2) * q
    return dense + attn


def bench_prefill(engine: LLMEngine, peak: float, quick: bool) -> list[str]:
    mc = engine.model_config
    rows = ["| prompts x tokens | ms | tokens/s | TFLOP/s | MFU vs measured matmul |", "|---|---|---|---|---|"]
    for n in (1, 4, 16):
        sb = prefill_batch(n, 2048, engine.info.page_size, mc.vocab_size)
        t = cuda_time(lambda: engine.runner.execute(sb), iters=3 if quick else 8, warmup=2)
        fl = model_flops(mc, n * 2048, 2048, n) / t
        rows.append(f"| {n} x 2048 | {t * 1e3:.1f} | {n * 2048 / t:.0f} | {fl / 1e12:.0f} | {fl / peak:.0%} |")
    return rows


def hf_copy(engine: LLMEngine):
    """A transformers LlamaForCausalLM holding exactly our weights (bf16, on the same GPU)."""
    import transformers

    mc = engine.model_config
    rope = dataclasses.asdict(mc.rope_scaling) if mc.rope_scaling else None
    hcfg = transformers.LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
        num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps, rope_theta=mc.rope_theta, rope_scaling=rope,
        max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings,
    )
    with torch.device(engine.kv_cache.device):
        hf = transformers.LlamaForCausalLM(hcfg).to(engine.kv_cache.dtype).eval()
    ours = dict(engine.runner.model.named_parameters())
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, (pname, start, end) in engine.runner.model.hf_weight_map().items():
            hf_params[name].copy_(ours[pname][start:end])
    return hf


def first_step_logprobs(engine: LLMEngine, hf, prompt: list[int]) -> str:
    """Top-5 logprobs of the first generated position, ours vs transformers, and HF's top-1/top-2 margin."""
    req = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    ours = req.output_logprobs[0].top
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt], device=hf.device)).logits[0, -1].float(), -1)
    top = torch.topk(lp, 5)
    ref = list(zip(top.indices.tolist(), top.values.tolist()))
    err = max(abs(v - lp[t].item()) for t, v in ours)
    margin = ref[0][1] - ref[1][1]
    return (f"first position: top-5 ids ours {[t for t, _ in ours]} vs hf {[t for t, _ in ref]}; max |logprob diff| "
            f"{err:.4f}; HF top1-top2 margin {margin:.4f}")


def bench_vs_hf(engine: LLMEngine, quick: bool) -> list[str]:
    hf = hf_copy(engine)
    prompt = [128000] + [(i * 977) % 120000 + 100 for i in range(63)]
    ours = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))[0].output_token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt], device=hf.device), max_new_tokens=16, do_sample=False)[0, 64:].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ours))
    dt = str(engine.kv_cache.dtype).removeprefix("torch.")
    rows = [f"greedy {dt} vs transformers: first {agree} of 16 tokens identical (ours {ours[:6]}..., hf {ref[:6]}...)"]
    rows.append(first_step_logprobs(engine, hf, prompt))
    rows.append("")
    n, inp, out = (4, 128, 32) if quick else (16, 128, 128)
    prompts = [[128000] + [(i * 31 + j * 7) % 120000 + 100 for j in range(inp - 1)] for i in range(n)]
    sp = SamplingParams(max_tokens=out, temperature=0, ignore_eos=True)
    t_ours = cuda_time(lambda: engine.generate(prompts, sp), iters=2, warmup=1)
    ids = torch.tensor(prompts, device=hf.device)
    with torch.no_grad():
        t_hf = cuda_time(lambda: hf.generate(ids, max_new_tokens=out, min_new_tokens=out, do_sample=False), iters=2, warmup=1)
    rows += ["| engine | prompts x (in, out) | seconds | output tokens/s | ratio |", "|---|---|---|---|---|",
             f"| transformers generate | {n} x ({inp}, {out}) | {t_hf:.2f} | {n * out / t_hf:.0f} | 1.00x |",
             f"| splitserve engine | {n} x ({inp}, {out}) | {t_ours:.2f} | {n * out / t_ours:.0f} | {t_hf / t_ours:.2f}x |"]
    del hf
    return rows


def run_mixed(engine: LLMEngine, args: argparse.Namespace) -> None:
    """Module step 5: a session turn's step, its profile alone (``--profile``), or its latency in the engine loop."""
    print(f"## A session turn's step (dummy {args.shape}, bf16, {args.mixed_batch} decoding, context "
          f"{args.mixed_context})\n")
    if args.profile:
        print("\n".join(profile_steps(engine, args.mixed_batch, args.mixed_context, 64)))
        return
    if args.profile_graphs:
        print("\n".join(profile_graph_steps(engine, args.mixed_batch, args.mixed_context, 65)))
        return
    if args.buckets:
        print("\n".join(bench_prefill_buckets(engine, args.mixed_context, 65, args.quick)))
        return
    if args.host_profile:
        print("\n".join(bench_turn_host(engine, args.mixed_batch, args.mixed_context, 65, 5 if args.quick else 30)))
        return
    print("\n".join(bench_mixed_steps(engine, args.mixed_batch, args.mixed_context, args.quick)) + "\n")
    print(f"A held turn arriving at a random point of a decode step, in the engine loop ({args.mixed_batch} "
          f"decoding at context {args.mixed_context}); modes alternate, twice each:\n")
    print("| turn's step | q new tokens | decode step ms (median) | arrival -> first token ms, median | p90 | "
          "decode rows' longest token gap around it, median ms |")
    print("|---|---:|---:|---:|---:|---:|")
    salt, modes = 0, args.turn_modes.split(",")
    unknown = sorted(set(modes) - set(TURN_STEPS))
    if unknown:
        raise SystemExit(f"--turn-modes: unknown {unknown}; choose from {sorted(TURN_STEPS)}")
    for q in args.turn_tokens:
        for mode in modes * 2:
            salt += 1
            print("\n".join(bench_turn_latency(engine, args.mixed_batch, args.mixed_context, q,
                                                5 if args.quick else 30, mode, salt)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--num-pages", type=int, default=16384, help="KV pool pages (16 tokens each)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--loop", action="store_true", help="only the engine decode loop table (overlap on and off)")
    ap.add_argument("--only-hf", action="store_true", help="skip the decode and prefill tables")
    ap.add_argument("--mixed", action="store_true", help="only a session turn's step and latency (module step 5)")
    ap.add_argument("--profile", action="store_true", help="with --mixed: only profile an eager decode step, a turn row, and both in one step")
    ap.add_argument("--host-profile", action="store_true",
                    help="with --mixed: only the host time of a turn's step against a decode step's, and its profile")
    ap.add_argument("--profile-graphs", action="store_true",
                    help="with --mixed: only profile the graph replays of a decode step and of a step with a turn row")
    ap.add_argument("--buckets", action="store_true",
                    help="with --mixed: only a turn's graph step in each prefill bucket (what padding costs)")
    ap.add_argument("--turn-modes", default=",".join(TURN_STEPS),
                    help="--mixed: the turn steps timed in the engine loop, in order (keys of benchmarks/agent.py "
                         "TURN_STEPS)")
    ap.add_argument("--turn-tokens", type=int, nargs="+", default=[64, 1024],
                    help="--mixed: the turns' new tokens, one loop each")
    ap.add_argument("--mixed-batch", type=int, default=32)
    ap.add_argument("--mixed-context", type=int, default=2560)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--hf-pages", type=int, default=2048)
    ap.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                    help="torch: reference attention and torch elementwise ops (no CUDA graphs)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    print(f"# SplitServe engine benchmark -- {card}, {datetime.date.today()}, torch {torch.__version__}")
    bw, peak = copy_bandwidth(dev), matmul_rate(dev)
    print(f"measured copy bandwidth {bw / 1e9:.0f} GB/s (read+write), bf16 matmul {peak / 1e12:.0f} TFLOP/s\n")
    cfg = EngineConfig(model=f"dummy:{args.shape}", device="cuda", dtype=args.dtype, num_pages=args.num_pages,
                       max_num_batched_tokens=32768, chunk_size=4096, max_num_seqs=256,
                       max_model_len=args.max_model_len, attention_backend=args.attention_backend,
                       enable_prefix_caching=args.mixed)
    t0 = time.perf_counter()
    engine = LLMEngine(cfg)
    print(f"engine built in {time.perf_counter() - t0:.1f}s ({engine.info.num_pages} pages)\n")
    if args.mixed:
        run_mixed(engine, args)
        return
    if args.loop:
        print("## Engine decode loop: overlapped steps on and off (dummy " + args.shape + ", bf16)\n")
        print("\n".join(bench_loop(engine, args.quick)))
        return
    if not args.only_hf:
        print("## Decode step (dummy " + args.shape + ", bf16, page 16)\n")
        print("\n".join(bench_decode(engine, bw, args.quick)) + "\n")
        print("## Prefill\n")
        print("\n".join(bench_prefill(engine, peak, args.quick)) + "\n")
    if not args.skip_hf:
        if args.only_hf:
            engine.runner.graphs = None
        del engine
        torch.cuda.empty_cache()
        engine = LLMEngine(cfg.model_copy(update={"num_pages": args.hf_pages}))
        print("## Against transformers (same weights)\n")
        print("\n".join(bench_vs_hf(engine, args.quick)))


if __name__ == "__main__":
    main()
