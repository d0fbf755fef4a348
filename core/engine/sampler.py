"""Token sampling: penalties, temperature, top-k / top-p / min-p, per-request seeds, logprobs.

Flow for one row of logits (:func:`sample_one`; :func:`sample_batch` takes one batched argmax instead when every
row is greedy with no bias, penalty or min_tokens):

0. Structured output (:func:`sample_batch`): rows with a grammar get its token mask first, for the whole batch at once
   (core/engine/grammar.py; on a copy when a row wants logprobs, which stay the model's own), so whichever path
   follows, only tokens the grammar allows can be drawn. A grammar row is never "plain" (:func:`argmax_only` is
   False); a greedy grammar row with nothing else asked (:func:`masked_argmax_only`) is the argmax of its masked
   logits, which the engine's overlapped decode path computes on the device (core/engine/runner.py ``seal``).

1. Check the parameters (:func:`check_params`; :func:`sample_batch` checks every row, whichever path it then
   takes): NaN, infinite or impossible values raise ``ValueError``.
2. In float64, add the ``logit_bias`` (a bias of -100 bans its token; if any bias is +100, only the tokens biased
   +100 stay drawable), apply the repetition / presence / frequency penalties, then forbid EOS and stop ids until
   ``min_tokens`` (ids outside the vocabulary can never be drawn, so they are ignored).
3. Greedy requests take the argmax; the others divide by the temperature and apply top-k, top-p and min-p.
4. After every operation that can overflow, NaN becomes -inf (never drawn) and +inf the largest finite value,
   so extreme but finite values (a repetition penalty of 1e-300, a temperature of 1e39) never yield NaN
   probabilities. A row with no token left (every logit -inf) raises ``ValueError``.
5. Draw from the softmax with the request's generator.

The caller (the model runner) turns an exception of one row into an error for that request only.

Seeded requests are reproducible and stateless: the n-th output token of a request with seed ``s`` is
drawn from a generator seeded with ``(s, n)``, so a prefill worker (n = 0) and a decode worker (n >= 1)
together draw exactly what one colocated worker draws, and a preempted request redraws the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch

from splitserve.core.messages import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from splitserve.core.engine.grammar import RequestGrammar

_SEED_MIX = 0x9E3779B97F4A7C15
_MASK64 = (1 << 63) - 1

_FLOAT_PARAMS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_RANGES = (
    ("temperature", lambda p: p.temperature >= 0, "must be >= 0"),
    ("top_p", lambda p: 0 < p.top_p <= 1, "must be in (0, 1]"),
    ("min_p", lambda p: 0 <= p.min_p <= 1, "must be in [0, 1]"),
    ("repetition_penalty", lambda p: p.repetition_penalty > 0, "must be > 0"),
    ("top_k", lambda p: p.top_k >= -1, "must be -1, 0 (disabled) or >= 1"),
    ("max_tokens", lambda p: p.max_tokens >= 0, "must be >= 0"),
    ("min_tokens", lambda p: p.min_tokens >= 0, "must be >= 0"),
    ("logprobs", lambda p: p.logprobs is None or p.logprobs >= 0, "must be >= 0"),
    ("prompt_logprobs", lambda p: p.prompt_logprobs is None or p.prompt_logprobs >= 0, "must be >= 0"),
)
"""What the sampler cannot honour at all; the router's API edge applies the tighter ranges that clients see."""


@dataclass(frozen=True)
class SampleInput:
    """One row of the logits matrix and the facts sampling needs about its request."""

    params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    eos_token_ids: frozenset[int] = frozenset()
    grammar: "RequestGrammar | None" = None
    """Structured output: the request's matcher (its mask is applied by :func:`sample_batch`)."""


def check_params(params: SamplingParams) -> None:
    """Raise ``ValueError`` naming the first parameter that is NaN, infinite or out of its possible range."""
    for name in _FLOAT_PARAMS:
        value = getattr(params, name)
        if not _is_finite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for token_id, bias in params.logit_bias:
        if not _is_finite(bias):
            raise ValueError(f"logit_bias must be finite numbers, got {bias!r} for token {token_id}")
    for name, ok, rule in _RANGES:
        if not ok(params):
            raise ValueError(f"{name} {rule}, got {getattr(params, name)!r}")


def _is_finite(value: object) -> bool:
    try:
        return math.isfinite(value)  # type: ignore[arg-type]
    except (TypeError, OverflowError):  # not a number, or an int too large for a float
        return False


def _finite(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf (never drawn); +inf -> the largest finite value (the limit of an overflowing logit)."""
    return torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf"))


def _id_tensor(ids: Iterable[int], vocab: int, device: torch.device) -> torch.Tensor:
    """Sorted distinct ids inside ``[0, vocab)`` as a long tensor (an id outside the vocabulary is never drawn)."""
    return torch.tensor(sorted({i for i in ids if 0 <= i < vocab}), dtype=torch.long, device=device)


BAN_BIAS, FORCE_BIAS = -100.0, 100.0
NO_TOKEN_LEFT = "no token is left to sample: the grammar and the logits allow no token"
"""Why a masked greedy row cannot be sampled (the same words on the synchronous and the overlapped path)."""


def apply_logit_bias(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Add each ``(token id, bias)`` of ``params.logit_bias`` to float ``[V]`` logits (ids outside ignored).

    A bias of -100 (or less) makes its token -inf; if any bias is +100 (or more), every token without such a bias
    becomes -inf, so the forced tokens are the only candidates. Returns a new tensor with no NaN or +inf.
    """
    pairs = [(t, b) for t, b in params.logit_bias if 0 <= t < logits.numel()]
    if not pairs:
        return logits
    ids = torch.tensor([t for t, _ in pairs], dtype=torch.long, device=logits.device)
    bias = torch.tensor([b for _, b in pairs], dtype=logits.dtype, device=logits.device)
    out = logits.clone()
    out.index_add_(0, ids, bias)
    out[ids[bias <= BAN_BIAS]] = float("-inf")
    forced = ids[bias >= FORCE_BIAS]
    if forced.numel():
        keep = torch.zeros_like(out, dtype=torch.bool)
        keep[forced] = True
        out = out.masked_fill(~keep, float("-inf"))
    return _finite(out)


def apply_penalties(logits: torch.Tensor, inp: SampleInput) -> torch.Tensor:
    """Repetition (HF: over prompt + output), presence and frequency (OpenAI: over output) penalties.

    Args:
        logits: float ``[V]`` (the sampler passes float64); returns a new tensor with no NaN or +inf.
    """
    p = inp.params
    out = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = _id_tensor(list(inp.prompt_token_ids) + list(inp.output_token_ids), out.numel(), out.device)
        if seen.numel():
            vals = out[seen]
            out[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    outputs = [i for i in inp.output_token_ids if 0 <= i < out.numel()]
    if (p.presence_penalty or p.frequency_penalty) and outputs:
        ids = torch.tensor(outputs, dtype=torch.long, device=out.device)
        counts = torch.zeros_like(out).index_add_(0, ids, torch.ones_like(ids, dtype=out.dtype))
        out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
    return _finite(out)


def _min_tokens_mask(logits: torch.Tensor, inp: SampleInput) -> torch.Tensor:
    """Forbid EOS and stop ids until ``min_tokens`` tokens were generated."""
    p = inp.params
    if len(inp.output_token_ids) >= p.min_tokens:
        return logits
    banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(inp.eos_token_ids))
    ids = _id_tensor(banned, logits.numel(), logits.device)
    if ids.numel():
        logits = logits.clone()
        logits[ids] = float("-inf")
    return logits


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: non-kept entries become -inf. ``logits``: float ``[V]``."""
    x = _finite(logits / max(params.temperature, 1e-5))
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
    """Pick one token from float ``[V]`` logits (greedy when temperature is 0 or top_k is 1).

    Raises ``ValueError`` for parameters :func:`check_params` rejects, or when no token is left to draw.
    """
    check_params(inp.params)
    return _sample_checked(logits, inp)


def _sample_checked(logits: torch.Tensor, inp: SampleInput) -> int:
    x = _min_tokens_mask(apply_penalties(apply_logit_bias(logits.double(), inp.params), inp), inp)
    if not inp.params.greedy:
        x = filter_logits(x, inp.params)
    if not bool(torch.isfinite(x).any()):
        raise ValueError("no token is left to sample: penalties, min_tokens and filters ruled out every token")
    if inp.params.greedy:
        return int(torch.argmax(x))
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
    Raises:
        ValueError: a row cannot be sampled (see :func:`sample_one`); the runner then samples row by row.
    """
    for inp in inputs:  # every row, so that whether a row fails never depends on the rows batched with it
        check_params(inp.params)
    x, masked = _masked(logits, inputs)
    if all(i.params.greedy and _no_processing(i.params) for i in inputs):
        if masked and not bool(torch.isfinite(x).any(dim=-1).all()):
            raise ValueError(NO_TOKEN_LEFT)
        tokens = torch.argmax(x, dim=-1).tolist()
    else:
        tokens = [_sample_checked(x[r], inp) for r, inp in enumerate(inputs)]
    lps: list[TokenLogprob | None] = [None] * len(inputs)
    want = [r for r, inp in enumerate(inputs) if inp.params.logprobs is not None]
    if want:
        full = torch.log_softmax(logits[want].float(), dim=-1).cpu()
        for k, r in enumerate(want):
            lps[r] = top_logprobs(full[k], tokens[r], inputs[r].params.logprobs or 0)
    return tokens, lps


def argmax_only(p: SamplingParams) -> bool:
    """The token is the logits' argmax and nothing else is asked (no logprobs): a device-side argmax serves it."""
    return p.greedy and p.logprobs is None and _plain(p)


def masked_argmax_only(p: SamplingParams) -> bool:
    """The token is the argmax of the logits after the grammar's mask (if any) and nothing else is asked: a
    device-side mask and argmax serve it (the overlapped decode path of grammar rows)."""
    return p.greedy and p.logprobs is None and _no_processing(p)


def _masked(logits: torch.Tensor, inputs: list[SampleInput]) -> tuple[torch.Tensor, bool]:
    """(``logits`` with every grammar row masked, whether any was) (module flow, step 0): masked in place, or on a
    copy when logprobs are asked (they are the model's own). A row whose request has a grammar but no matcher raises
    ``ValueError`` (it is never sampled unconstrained)."""
    rows = []
    for r, inp in enumerate(inputs):
        if inp.params.grammar is not None and inp.grammar is None:
            raise ValueError("the request has a grammar but no matcher on this worker")
        if inp.grammar is not None:
            rows.append((r, inp.grammar))
    if not rows:
        return logits, False
    from splitserve.core.engine.grammar import apply_masks

    x = logits.clone() if any(inp.params.logprobs is not None for inp in inputs) else logits
    apply_masks(x, rows)
    return x, True


def _no_processing(p: SamplingParams) -> bool:
    """No logit bias, no penalties and no min_tokens: once the grammar masks are applied, a batched argmax gives the
    same token."""
    return not p.history_shapes_logits and not p.logit_bias


def _plain(p: SamplingParams) -> bool:
    """No logit bias, no penalties, no min_tokens and no grammar: the raw batched argmax gives the same token."""
    return _no_processing(p) and p.grammar is None
