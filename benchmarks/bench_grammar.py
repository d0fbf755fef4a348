"""Structured output: what the grammar mask costs per decode step, against the unconstrained step in the same run.

Flow:
1. Engine steps (``--model``, default the built-in model): for each batch size and each mode of ``--modes``
   (``overlap``: overlapped decode steps, where plain and grammar greedy rows both run in serving; ``sync``: the
   synchronous step), ``batch`` greedy requests decode ``--steps`` tokens with no grammar, then the same requests
   with a grammar that never ends (the inside of a JSON string value, where nearly every token is allowed: the common
   and costly state). Alternated, the best of ``--repeats`` kept; ms per step is the median time between consecutive
   ``step()`` returns (no device sync inside the window, so an overlapped step is timed as it runs in serving).
2. The mask alone (``--mask-vocab``: the model's tokenizer, or ``synthetic:N`` for an N-token byte-fallback
   vocabulary such as a Llama-3-sized 128000): ``batch`` matchers in that state fill the reused bitmask of the
   overlapped path (host), which is uploaded and applied to ``[batch, V]`` logits on ``--device``; also the kernel
   alone (CUDA) and the synchronous path's apply (fresh bitmask, pinned copy, index list) for comparison.

    python benchmarks/bench_grammar.py [--model M] [--batches 1,8,64] [--steps 32] [--modes overlap,sync]
    python benchmarks/bench_grammar.py --model dummy:llama3-8b --synthetic-tokenizer 128256 --device cuda
"""

from __future__ import annotations

import argparse
import random
import statistics
import string
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the engine are imported in main(): `splitserve bench --help` stays light
    from splitserve.core.engine.engine import LLMEngine
    from splitserve.core.engine.grammar import GrammarStates
    from splitserve.core.tokenizer import Tokenizer

JSON_STRING = 'root ::= "{\\"text\\": \\"" body\nbody ::= [^"\\\\\\x00-\\x1f] body'
"""An endless JSON string value (EBNF): the matcher stays inside a string, where nearly every token is allowed."""
PROMPT = "Once upon a time"


def engine_step_ms(engine: LLMEngine, tok: Tokenizer, batch: int, steps: int,
                   grammar: tuple[str, str] | None) -> tuple[float, list[list[int]]]:
    """(median ms between consecutive ``step()`` returns, every request's output tokens) of ``batch`` greedy requests
    with distinct prompts decoding (timed after their prefill, one step, and two warm-up steps); the device is
    synchronised only around the window."""
    from splitserve.core.messages import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True, grammar=grammar)
    # distinct prompts: copies of one prompt would be admitted one per step (each waits for the previous one's
    # prefill to hit the prefix cache), so the timed steps would not have ``batch`` rows
    reqs = [engine.add_request(f"b{batch}-{grammar is not None}-{engine.cfg.async_scheduling}-{i}",
                               tok.encode(f"{PROMPT} ({i})"), params) for i in range(batch)]
    for _ in range(3):  # prefill, then warm-up decode steps
        engine.step()
    sync(engine)
    stamps = [time.perf_counter()]
    while engine.has_unfinished() and len(stamps) <= steps:
        engine.step()
        stamps.append(time.perf_counter())
    while engine.has_unfinished():
        engine.step()
    sync(engine)
    return statistics.median((b - a) * 1e3 for a, b in zip(stamps, stamps[1:])), [r.output_token_ids for r in reqs]


def sync(engine: LLMEngine) -> None:
    import torch

    if engine.kv_cache.is_cuda:
        torch.cuda.synchronize()


def synthetic_tokenizer(size: int, seed: int = 0) -> Tokenizer:
    """A byte-fallback BPE vocabulary of ``size`` tokens: 3 specials, 256 bytes, then random ``▁word`` pieces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders
    from tokenizers.models import BPE

    from splitserve.core.tokenizer import Tokenizer

    rng = random.Random(seed)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    letters = string.ascii_letters + string.digits + ".,:;!?'\"{}[]()-_ "
    while len(vocab) < size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
        vocab.setdefault(("▁" if rng.random() < 0.5 else "") + word, len(vocab))
    backend = HFTokenizer(BPE(vocab, [], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, {"eos_token": "</s>", "bos_token": "<s>"}, name=f"synthetic:{size}")


def mask_ms(states: GrammarStates, tok: Tokenizer, batch: int, steps: int, device: str) -> dict[str, float]:
    """Median ms per step of ``batch`` matchers inside a JSON string: ``fill`` (the matchers fill the overlapped path's
    reused bitmask on the host, as the engine does: ``GrammarStates.fill_rows``), ``apply`` (its upload and kernel, waited for), ``kernel`` (the kernel alone, CUDA
    event time; NaN on CPU) and ``sync_apply`` (the synchronous path: fresh bitmask, pinned copy, index list); and
    ``exact``: 1.0 when the first apply equalled the torch reference (core/engine/grammar.py), else 0.0."""
    import torch
    import xgrammar as xgr

    from splitserve.core.engine.grammar import StepBitmask, apply_bitmask, apply_bitmask_reference

    vocab = states.vocab_size
    rows = []
    for i in range(batch):
        state = states.add(f"m{i}", ("grammar", JSON_STRING))
        for t in tok.encode('{"text": "', add_special_tokens=False):
            state.accept(t)
        rows.append((i, state))
    logits = torch.randn(batch, vocab, device=device)
    indices = [row for row, _ in rows]
    step = StepBitmask(vocab, logits.device, capacity=batch)
    times: dict[str, list[float]] = {"fill": [], "apply": [], "kernel": [], "sync_apply": [], "exact": []}
    for _ in range(steps):
        t0 = time.perf_counter()
        bits = step.rows(batch)
        if states.fill_rows(bits, [(row, f"m{row}") for row in indices]):
            raise RuntimeError("a matcher failed to fill its bitmask row")
        t1 = time.perf_counter()
        expect = apply_bitmask_reference(logits, bits.to(logits.device)) if not times["exact"] else None
        step.apply(logits, indices)
        device_sync(logits)
        t2 = time.perf_counter()
        if expect is not None:  # the kernel against the torch reference, once
            times["exact"].append(float(torch.equal(logits, expect)))
        times["fill"].append((t1 - t0) * 1e3)
        times["apply"].append((t2 - t1) * 1e3)
        times["kernel"].append(kernel_ms(lambda: apply_bitmask(logits, step.device_rows[:batch]), logits))
        t3 = time.perf_counter()
        bitmask = xgr.allocate_token_bitmask(batch, vocab)
        bitmask.copy_(bits)
        if logits.is_cuda:
            bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
        device_sync(logits)
        times["sync_apply"].append((time.perf_counter() - t3) * 1e3)
    for row, _ in rows:
        states.discard(f"m{row}")
    return {k: statistics.median(v) for k, v in times.items()}


def device_sync(t) -> None:
    import torch

    if t.is_cuda:
        torch.cuda.synchronize()


def kernel_ms(fn, logits) -> float:
    """Device time of ``fn()`` in ms (CUDA events); NaN for CPU tensors."""
    import torch

    if not logits.is_cuda:
        return float("nan")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def use_synthetic_tokenizer(size: int) -> str:
    """Write a synthetic tokenizer of ``size`` tokens to a temporary directory and make it the tokenizer of
    ``dummy:`` models (``SPLITSERVE_TOKENIZER``), so a real-shape model masks over a real-size vocabulary."""
    import json
    import os
    import tempfile

    folder = tempfile.mkdtemp(prefix="bench-grammar-tok-")
    synthetic_tokenizer(size).backend.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "</s>", "bos_token": "<s>"}, f)
    os.environ["SPLITSERVE_TOKENIZER"] = folder
    return folder


def main(args: argparse.Namespace) -> int:
    import torch

    from splitserve.core.config import EngineConfig
    from splitserve.core.engine.engine import LLMEngine
    from splitserve.core.tokenizer import load_tokenizer

    batches = [int(b) for b in args.batches.split(",")]
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or any(m not in ("overlap", "sync") for m in modes):
        raise SystemExit(f"--modes: overlap and/or sync, got {args.modes!r}")
    if args.synthetic_tokenizer:
        use_synthetic_tokenizer(args.synthetic_tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EngineConfig(model=args.model, device=device, num_pages=args.num_pages, page_size=16,
                       max_num_seqs=max(batches), async_scheduling=True)
    engine, tok = LLMEngine(cfg), load_tokenizer(args.model)
    engine_step_ms(engine, tok, 1, 4, ("grammar", JSON_STRING))  # xgrammar import and first compile, untimed
    print(f"model {args.model} on {device}, vocabulary {engine.model_config.vocab_size}, {args.steps} steps")
    print("same tokens: every run of a batch size gave the same tokens (per kind of row, across repeats and modes)")
    print(f"{'batch':>5} {'mode':>8} {'plain ms/step':>14} {'grammar ms/step':>16} {'ratio':>7} {'same tokens':>12}")
    for b in batches:
        outputs: dict[bool, list[list[list[int]]]] = {False: [], True: []}
        for mode in modes:
            engine.cfg = cfg.model_copy(update={"async_scheduling": mode == "overlap"})
            best = {False: float("inf"), True: float("inf")}
            for _ in range(args.repeats):  # alternated, best kept: a busy host slows one run, not the comparison
                for constrained in (False, True):
                    grammar = ("grammar", JSON_STRING) if constrained else None
                    ms, toks = engine_step_ms(engine, tok, b, args.steps, grammar)
                    best[constrained] = min(best[constrained], ms)
                    outputs[constrained].append(toks)
            same = all(o == runs[0] for runs in outputs.values() for o in runs)
            print(f"{b:>5} {mode:>8} {best[False]:>14.3f} {best[True]:>16.3f} {best[True] / best[False]:>7.3f} "
                  f"{str(same):>12}")
    print_mask_table(args, tok, batches, device)
    return 0


def print_mask_table(args: argparse.Namespace, tok: Tokenizer, batches: list[int], device: str) -> None:
    from splitserve.core.engine.grammar import GrammarStates

    mask_tok = tok if args.mask_vocab == "model" else synthetic_tokenizer(int(args.mask_vocab.split(":", 1)[1]))
    print(f"mask alone, vocabulary {mask_tok.name}, logits on {device}")
    print(f"{'batch':>5} {'fill ms':>9} {'upload+apply ms':>16} {'kernel ms':>10} {'sync-path apply ms':>19} "
          f"{'= reference':>12}")
    states = GrammarStates(lambda: mask_tok, mask_tok.vocab_size, [2])
    for b in batches:
        t = mask_ms(states, mask_tok, b, args.steps, device)
        print(f"{b:>5} {t['fill']:>9.3f} {t['apply']:>16.3f} {t['kernel']:>10.3f} {t['sync_apply']:>19.3f} "
              f"{str(t['exact'] == 1.0):>12}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:tiny-random-llama", help="engine model (default: %(default)s)")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, best kept (default: %(default)s)")
    p.add_argument("--modes", default="overlap",
                   help="decode steps to compare, comma-separated: overlap (overlapped decode, as in serving) and/or "
                        "sync (synchronous steps) (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--num-pages", type=int, default=2048, help="KV pages of 16 tokens (default: %(default)s)")
    p.add_argument("--synthetic-tokenizer", type=int, default=0, metavar="N",
                   help="dummy: models: use a synthetic N-token tokenizer for the grammar (default: off)")
    p.add_argument("--mask-vocab", default="synthetic:128000",
                   help="vocabulary of the mask-alone table: 'model' or synthetic:N (default: %(default)s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
