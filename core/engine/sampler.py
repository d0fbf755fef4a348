"""Token sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds, logprobs.

Seeded requests are reproducible and stateless: the n-th output token of a request with seed ``s`` is
drawn from a generator seeded with ``(s, n)``, so a prefill worker (n = 0) and a decode worker (n >= 1)
together draw exactly what one colocated worker draws, and a preempted request redraws the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.core.messages import SamplingParams, TokenLogprob

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 63) - 1


@dataclass(frozen=True)
class SampleInput:
    """One row of the logits matrix and the facts sampling needs about its request."""

    params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    eos_token_ids: frozenset[int] = frozenset()


def apply_penalties(logits: torch.Tensor, inp: SampleInput) -> torch.Tensor:
    """Repetition (HF: over prompt + output), presence and frequency (OpenAI: over output) penalties.

    Args:
        logits: float32 ``[V]``; returns a new tensor.
    """
    p = inp.params
    out = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(inp.prompt_token_ids) | set(inp.output_token_ids)), dtype=torch.long)
        if seen.numel():
            vals = out[seen.to(out.device)]
            out[seen.to(out.device)] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and inp.output_token_ids:
        ids = torch.tensor(inp.output_token_ids, dtype=torch.long, device=out.device)
        counts = torch.zeros_like(out).index_add_(0, ids, torch.ones_like(ids, dtype=out.dtype))
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
    return out


def _min_tokens_mask(logits: torch.Tensor, inp: SampleInput) -> torch.Tensor:
    """Forbid EOS and stop ids until ``min_tokens`` tokens were generated."""
    p = inp.params
    if len(inp.output_token_ids) >= p.min_tokens:
        return logits
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(inp.eos_token_ids))
    if banned:
        logits = logits.clone()
        logits[torch.tensor(sorted(banned), device=logits.device)] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: non-kept entries become -inf. ``logits``: float32 ``[V]``."""
    x = logits / max(params.temperature, 1e-5)
    if params.top_k > 0 and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > params.top_p  # keep the smallest set whose mass reaches top_p
        x = x.clone()
        x[idx[drop]] = float("-inf")
    if params.min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return x


def _generator(params: SamplingParams, step: int, device: torch.device) -> torch.Generator | None:
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(((params.seed * _SEED_MIX) ^ (step + 1) * 0x2545F4914F6CDD1D) & _MASK64)
    return g


def sample_one(logits: torch.Tensor, inp: SampleInput) -> int:
    """Pick one token from float32 ``[V]`` logits (greedy when temperature is 0 or top_k is 1)."""
    x = _min_tokens_mask(apply_penalties(logits, inp), inp)
    if inp.params.greedy:
        return int(torch.argmax(x))
    x = filter_logits(x, inp.params)
    probs = torch.softmax(x, dim=-1)
    gen = _generator(inp.params, len(inp.output_token_ids), probs.device)
    return int(torch.multinomial(probs, 1, generator=gen))


def top_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> TokenLogprob:
    """Logprob of ``token_id`` and the ``n`` most likely alternatives. ``logprobs``: float32 ``[V]``."""
    top: tuple[tuple[int, float], ...] = ()
    if n > 0:
        vals, ids = torch.topk(logprobs, min(n, logprobs.numel()))
        top = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)


def sample_batch(logits: torch.Tensor, inputs: list[SampleInput]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Sample every row.

    Args:
        logits: float32 ``[N, V]``, one row per entry of ``inputs``.
    Returns:
        token ids and, for requests that asked for logprobs, the model's logprobs (before penalties and
        temperature, as OpenAI reports them).
    """
    if all(i.params.greedy and _plain(i.params) for i in inputs):
        tokens = torch.argmax(logits, dim=-1).tolist()
    else:
        tokens = [sample_one(logits[r], inp) for r, inp in enumerate(inputs)]
    lps: list[TokenLogprob | None] = [None] * len(inputs)
    want = [r for r, inp in enumerate(inputs) if inp.params.logprobs is not None]
    if want:
        full = torch.log_softmax(logits[want].float(), dim=-1).cpu()
        for k, r in enumerate(want):
            lps[r] = top_logprobs(full[k], tokens[r], inputs[r].params.logprobs or 0)
    return tokens, lps


def _plain(p: SamplingParams) -> bool:
    """No penalties and no min_tokens: a batched argmax gives the same token."""
    return p.repetition_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty and p.min_tokens == 0
