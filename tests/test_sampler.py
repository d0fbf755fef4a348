"""The sampler under extreme parameter values: valid token ids or a ValueError, never NaN or another exception.

``extreme_params`` is also used by tests/test_engine.py to drive whole engine steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.core.engine.sampler import SampleInput, check_params, sample_batch, sample_one
from splitserve.core.messages import SamplingParams

V = 64
EOS = 2
NAN, INF = math.nan, math.inf
EXTREME_FLOATS = [0.0, -0.0, 1.0, 0.5, 1e-300, 5e-324, 2.2250738585072014e-308, 1e-45, 1e39, 1e300, -1e300,
                  1.7976931348623157e308, -1e-300, NAN, INF, -INF]
EXTREME_INTS = [-(2**63), -2, -1, 0, 1, 2, V - 1, V, 100000, 2**31, 2**63 - 1, 2**64 - 1, 10**30]
FLOATS = st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
INTS = st.one_of(st.sampled_from(EXTREME_INTS), st.integers())


VALID = {  # every value the sampler accepts, extremes included (subnormals, 1e300, huge ints)
    "temperature": st.floats(min_value=0.0, allow_infinity=False),
    "top_p": st.floats(min_value=0.0, max_value=1.0, exclude_min=True),
    "min_p": st.floats(min_value=0.0, max_value=1.0),
    "repetition_penalty": st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
    "presence_penalty": st.floats(allow_nan=False, allow_infinity=False),
    "frequency_penalty": st.floats(allow_nan=False, allow_infinity=False),
    "top_k": st.one_of(st.sampled_from([-1, 1, V - 1, V, 2**63 - 1, 10**30]), st.integers(min_value=-1)),
    "min_tokens": st.one_of(st.sampled_from([1, 2**64 - 1, 10**30]), st.integers(min_value=0)),
    "logprobs": st.one_of(st.sampled_from([0, V, 10**9, 10**30]), st.integers(min_value=0)),
    "max_tokens": st.one_of(st.sampled_from([0, 1, 2**64 - 1]), st.integers(min_value=0)),
}
DEFAULTS = {name: getattr(SamplingParams(), name) for name in VALID}


@st.composite
def extreme_params(draw, max_tokens=None, valid=st.booleans()) -> SamplingParams:
    """SamplingParams built directly (no API edge check), each field its default or an extreme value: only values
    the sampler accepts when ``valid`` draws True, else anything (NaN, infinities, negative ints...)."""
    only_valid = draw(valid)

    def field(name: str):
        anything = FLOATS if isinstance(DEFAULTS[name], float) else INTS
        return draw(st.one_of(st.just(DEFAULTS[name]), VALID[name] if only_valid else anything))

    return SamplingParams(
        max_tokens=draw(max_tokens) if max_tokens is not None else field("max_tokens"),
        seed=draw(st.one_of(st.none(), INTS)),
        stop_token_ids=tuple(draw(st.lists(INTS, max_size=4))), ignore_eos=draw(st.booleans()),
        logprobs=draw(st.one_of(st.none(), st.just(field("logprobs")))),
        prompt_logprobs=draw(st.one_of(st.none(), st.just(field("logprobs")))),
        **{name: field(name) for name in VALID if name not in ("logprobs", "max_tokens")},
    )


def _inputs(params: list[SamplingParams], outputs: list[list[int]]) -> list[SampleInput]:
    return [SampleInput(p, prompt_token_ids=(1, 5, 9, 5), output_token_ids=tuple(o), eos_token_ids=frozenset({EOS}))
            for p, o in zip(params, outputs)]


def _check_rows(tokens, lps, params) -> None:
    assert len(tokens) == len(params) and all(isinstance(t, int) and 0 <= t < V for t in tokens)
    for t, lp, p in zip(tokens, lps, params):
        assert (lp is None) == (p.logprobs is None)
        if lp is not None:
            assert lp.token_id == t and len(lp.top) == min(max(p.logprobs, 0), V)


@settings(max_examples=250, deadline=None)
@given(params=st.lists(extreme_params(), min_size=1, max_size=3),
       outputs=st.lists(st.lists(st.integers(0, V - 1), max_size=5), min_size=3, max_size=3),
       scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]), special=st.sampled_from([None, NAN, INF, -INF]),
       seed=st.integers(0, 2**32 - 1))
def test_sample_batch_gives_valid_ids_or_value_error(params, outputs, scale, special, seed):
    """What the runner relies on: a batch gives valid ids or a ValueError; then each row alone does the same, and
    at least one row alone raises (the one the engine fails)."""
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(seed)) * scale
    if special is not None:
        logits[:, seed % V] = special
    inputs = _inputs(params, outputs)
    try:
        tokens, lps = sample_batch(logits, inputs)
    except ValueError:
        failed = 0
        for r, inp in enumerate(inputs):
            try:
                _check_rows(*sample_batch(logits[r : r + 1], [inp]), [inp.params])
            except ValueError:
                failed += 1
        assert failed >= 1
        return
    _check_rows(tokens, lps, params)


def test_the_issue_12_poison_values_sample_with_their_limit_meaning():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0] + [0.0] * (V - 4))
    seen = SampleInput(SamplingParams(temperature=0, repetition_penalty=1e-300), (0, 2), ())
    assert sample_one(logits, seen) == 2  # seen positive logits grow without bound: the largest of them wins
    subnormal = SampleInput(SamplingParams(temperature=0, repetition_penalty=5e-324), (0, 2), ())
    assert sample_one(logits, subnormal) in (0, 2)  # overflows to +inf, clamped: still a seen token
    hot = [SampleInput(SamplingParams(temperature=1e39, min_tokens=1, seed=s), (1,), (), frozenset({EOS}))
           for s in range(200)]
    draws = {sample_one(logits, inp) for inp in hot}
    assert EOS not in draws and len(draws) > V // 2  # uniform over every token but the banned EOS
    unknown_stop = SamplingParams(temperature=0, min_tokens=1, stop_token_ids=(100000, -1))
    assert sample_one(logits, SampleInput(unknown_stop, (1,), ())) == 1  # ids outside the vocabulary are ignored


@pytest.mark.parametrize("field, value", [
    ("temperature", NAN), ("temperature", -1.0), ("top_p", INF), ("top_p", 0.0), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -INF), ("presence_penalty", NAN), ("frequency_penalty", INF),
    ("top_k", -2), ("min_tokens", -1), ("max_tokens", -1), ("logprobs", -1), ("prompt_logprobs", -1),
    ("temperature", 10**400),
])
def test_check_params_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        check_params(SamplingParams(**{field: value}))


def test_no_token_left_is_a_value_error():
    banned = SamplingParams(min_tokens=2, stop_token_ids=tuple(range(V)), seed=1)
    with pytest.raises(ValueError, match="no token is left"):
        sample_one(torch.zeros(V), SampleInput(banned, (1,), ()))


def test_logit_bias_bans_forces_and_shifts_for_greedy_and_sampled_rows():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0] + [0.0] * (V - 4))
    greedy = SamplingParams(temperature=0, logit_bias=((1, -100.0),))
    assert sample_one(logits, SampleInput(greedy, (1,), ())) == 2  # the argmax is banned: the runner-up wins
    shifted = SamplingParams(temperature=0, logit_bias=((3, 5.0),))
    assert sample_one(logits, SampleInput(shifted, (1,), ())) == 3  # -1 + 5 beats 3
    forced = [SampleInput(SamplingParams(temperature=1.0, seed=s, logit_bias=((7, 100.0), (9, 100.0))), (1,), ())
              for s in range(40)]
    assert {sample_one(logits, inp) for inp in forced} == {7, 9}  # only the +100 tokens are drawable
    banned = [SampleInput(SamplingParams(temperature=1e4, seed=s, logit_bias=tuple((t, -100.0) for t in range(1, V))),
                          (1,), ()) for s in range(5)]
    assert {sample_one(logits, inp) for inp in banned} == {0}
    outside = SamplingParams(temperature=0, logit_bias=((V + 5, 100.0), (-1, 100.0)))
    assert sample_one(logits, SampleInput(outside, (1,), ())) == 1  # ids outside the vocabulary are ignored


def test_a_biased_row_never_takes_the_batched_argmax():
    logits = torch.tensor([[1.0, 3.0, 2.0] + [0.0] * (V - 3)] * 2)
    plain, biased = SamplingParams(temperature=0), SamplingParams(temperature=0, logit_bias=((1, -100.0),))
    tokens, _ = sample_batch(logits, _inputs([plain, biased], [[], []]))
    assert tokens == [1, 2]
    tokens, lps = sample_batch(logits, _inputs([biased, SamplingParams(temperature=0, logprobs=1)], [[], []]))
    assert tokens == [2, 1] and lps[1].token_id == 1


@pytest.mark.parametrize("bias", [NAN, INF, -INF])
def test_check_params_refuses_non_finite_logit_bias(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        check_params(SamplingParams(logit_bias=((3, bias),)))
