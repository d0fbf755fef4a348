"""Structured output: what the grammar mask costs per decode step, against the unconstrained step in the same run.

Flow:
1. Engine steps (``--model``, default the built-in model): for each batch size, ``batch`` greedy requests decode
   ``--steps`` tokens with no grammar, then the same requests with a grammar that never ends (the inside of a JSON
   string value, where nearly every token is allowed: the common and costly state). Both run the synchronous step
   (rows with a grammar never take the overlapped decode path), alternated and the best of ``--repeats`` kept; the
   table gives ms per step and their ratio.
2. The mask alone (``--mask-vocab``: the model's tokenizer, or ``synthetic:N`` for an N-token byte-fallback
   vocabulary such as a Llama-3-sized 128000): ``batch`` matchers in that state fill one bitmask (host) and it is
   applied to ``[batch, V]`` logits on ``--device``; ms per step for the fill and the apply.

    python benchmarks/bench_grammar.py [--model M] [--batches 1,8,64] [--steps 32] [--mask-vocab synthetic:128000]
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


def engine_step_ms(engine: LLMEngine, tok: Tokenizer, batch: int, steps: int, grammar: tuple[str, str] | None) -> float:
    """Median ms of one decode step of ``batch`` greedy requests (after their prefill and two warm-up steps)."""
    from splitserve.core.messages import SamplingParams

    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True, grammar=grammar)
    ids = tok.encode(PROMPT)
    for i in range(batch):
        engine.add_request(f"b{batch}-{grammar is not None}-{i}", ids, params)
    for _ in range(3):  # prefill, then warm-up decode steps
        engine.step()
    times = []
    while engine.has_unfinished() and len(times) < steps:
        sync(engine)
        t0 = time.perf_counter()
        engine.step()
        sync(engine)
        times.append((time.perf_counter() - t0) * 1e3)
    while engine.has_unfinished():
        engine.step()
    return statistics.median(times)


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


def mask_ms(states: GrammarStates, tok: Tokenizer, batch: int, steps: int, device: str) -> tuple[float, float]:
    """(fill ms, apply ms) per step of ``batch`` matchers inside a JSON string: the fill allocates
    the bitmask and fills every row on the host; the apply moves it to the logits' device and masks (as
    core/engine/grammar.py's ``apply_masks`` does)."""
    import torch
    import xgrammar as xgr

    vocab = states.vocab_size
    rows = []
    for i in range(batch):
        state = states.add(f"m{i}", ("grammar", JSON_STRING))
        for t in tok.encode('{"text": "', add_special_tokens=False):
            state.accept(t)
        rows.append((i, state))
    logits = torch.randn(batch, vocab, device=device)
    indices = [row for row, _ in rows]
    fills, applies = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        bitmask = xgr.allocate_token_bitmask(batch, vocab)
        for row, state in rows:
            state.fill(bitmask, row)
        t1 = time.perf_counter()
        if logits.is_cuda:
            bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=indices)
        if logits.is_cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        fills.append((t1 - t0) * 1e3)
        applies.append((t2 - t1) * 1e3)
    for row, _ in rows:
        states.discard(f"m{row}")
    return statistics.median(fills), statistics.median(applies)


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
    from splitserve.core.engine.grammar import GrammarStates
    from splitserve.core.tokenizer import load_tokenizer

    batches = [int(b) for b in args.batches.split(",")]
    if args.synthetic_tokenizer:
        use_synthetic_tokenizer(args.synthetic_tokenizer)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = EngineConfig(model=args.model, device=device, num_pages=args.num_pages, page_size=16,
                       max_num_seqs=max(batches), async_scheduling=False)
    engine, tok = LLMEngine(cfg), load_tokenizer(args.model)
    engine_step_ms(engine, tok, 1, 4, ("grammar", JSON_STRING))  # xgrammar import and first compile, untimed
    print(f"model {args.model} on {device}, vocabulary {engine.model_config.vocab_size}, {args.steps} steps")
    print(f"{'batch':>5} {'plain ms/step':>14} {'grammar ms/step':>16} {'ratio':>7}")
    for b in batches:  # alternated, best of --repeats: a busy host slows one run, not the comparison
        plain, constrained = float("inf"), float("inf")
        for _ in range(args.repeats):
            plain = min(plain, engine_step_ms(engine, tok, b, args.steps, None))
            constrained = min(constrained, engine_step_ms(engine, tok, b, args.steps, ("grammar", JSON_STRING)))
        print(f"{b:>5} {plain:>14.3f} {constrained:>16.3f} {constrained / plain:>7.3f}")
    mask_tok = tok if args.mask_vocab == "model" else synthetic_tokenizer(int(args.mask_vocab.split(":", 1)[1]))
    print(f"mask alone, vocabulary {mask_tok.name}, logits on {device}")
    print(f"{'batch':>5} {'fill ms':>9} {'apply ms':>9} {'per row us':>11}")
    states = GrammarStates(lambda: mask_tok, mask_tok.vocab_size, [2])
    for b in batches:
        fill, apply = mask_ms(states, mask_tok, b, args.steps, device)
        print(f"{b:>5} {fill:>9.3f} {apply:>9.3f} {(fill + apply) * 1e3 / b:>11.1f}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="builtin:tiny-random-llama", help="engine model (default: %(default)s)")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default: %(default)s)")
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per batch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration, best kept (default: %(default)s)")
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
