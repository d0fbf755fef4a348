"""``splitserve bench serve``: load-test any OpenAI-compatible server over streaming ``/v1/completions``.

Requests arrive on a Poisson schedule (gamma inter-arrival times when ``--burstiness`` is not 1),
on a fixed-rate schedule (``--arrival fixed``) or all at once (``--request-rate inf``). Every request
asks for exactly ``output_len`` tokens (``ignore_eos`` + ``max_tokens``), so any OpenAI-compatible
server can be measured. Reported: TTFT, TPOT, ITL and end-to-end latency (mean, p50, p90, p99),
request and token throughput, goodput (completed requests per second that meet every SLO given)
and failures.

The pure parts (arrival schedule, datasets, percentiles, summary) are plain functions so they are
unit-tested without a server. Top-level imports stay light: aiohttp is imported where requests are
sent, the tokenizer only when ``--tokenizer`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Protocol, Sequence

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
MAX_ERROR_KINDS = 10


# ----------------------------------------------------------------------------------------------
# Arrivals
# ----------------------------------------------------------------------------------------------


def arrival_offsets(
    num: int, rate: float, *, burstiness: float = 1.0, fixed: bool = False, rng: random.Random
) -> list[float]:
    """Send times, in seconds from the start, of ``num`` requests at ``rate`` requests per second.

    ``rate == inf``: every request at time 0. ``fixed``: exactly ``1 / rate`` apart. Otherwise
    inter-arrival gaps are gamma distributed with shape ``burstiness`` and mean ``1 / rate``;
    ``burstiness == 1`` is a Poisson process, smaller is burstier, larger is more regular.
    The first request is sent at time 0.
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 (or inf), got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * num
    offsets, now = [], 0.0
    for i in range(num):
        if i > 0:
            now += 1.0 / rate if fixed else rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        offsets.append(now)
    return offsets


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One request to send: text (when a tokenizer is given) or token ids, and its lengths."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


def sample_lengths(mean: int, range_ratio: float, num: int, rng: random.Random) -> list[int]:
    """``num`` lengths drawn uniformly from ``[mean * (1 - r), mean * (1 + r)]`` (at least 1)."""
    if mean < 1:
        raise ValueError(f"length must be >= 1, got {mean}")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(mean * (1.0 - range_ratio)))
    high = max(low, int(mean * (1.0 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num)]


def random_ids(rng: random.Random, num: int, pool: Sequence[int]) -> list[int]:
    """``num`` token ids drawn uniformly from ``pool`` (e.g. ``range(1, vocab_size)``: id 0 is often padding)."""
    if not pool:
        raise ValueError("no token ids to draw from")
    return [rng.choice(pool) for _ in range(num)]


@dataclass(frozen=True)
class DatasetSpec:
    """What prompts to build; see :func:`build_dataset`."""

    kind: str  # "random" or "prefix"
    num_prompts: int
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    prefix_len: int = 0
    """Prefix dataset: tokens shared by prompts of one group (counted inside ``input_len``)."""
    num_prefixes: int = 1


class TextCodec(Protocol):
    """What the benchmark needs from a tokenizer (``splitserve.core.tokenizer.Tokenizer`` fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...


def text_token_ids(tok: TextCodec, vocab_size: int) -> list[int]:
    """Ids that decode on their own to printable text (byte-fallback pieces and specials excluded)."""
    ids = []
    for i in range(vocab_size):
        piece = tok.decode([i])
        if piece.strip() and piece.isprintable() and "\ufffd" not in piece:
            ids.append(i)
    return ids


def text_of_length(tok: TextCodec, ids: list[int], rng: random.Random, pool: Sequence[int], rounds: int = 8) -> tuple[str, int]:
    """Text that re-tokenizes to about ``len(ids)`` tokens, and its actual token count.

    Random ids rarely survive decode + encode unchanged (merges), so the ids are re-encoded and
    trimmed or topped up from ``pool`` until the round trip is stable or ``rounds`` run out.
    """
    target = len(ids)
    text = tok.decode(ids)
    for _ in range(rounds):
        got = tok.encode(text, add_special_tokens=False)
        if len(got) == target:
            break
        ids = got[:target] if len(got) > target else got + random_ids(rng, target - len(got), pool)
        text = tok.decode(ids)
    return text, len(tok.encode(text, add_special_tokens=False))


def build_dataset(
    spec: DatasetSpec, rng: random.Random, vocab_size: int, tokenizer: TextCodec | None = None
) -> list[Prompt]:
    """Random prompts (``random``) or shared prefix + unique suffix (``prefix``).

    Without ``tokenizer`` prompts are lists of token ids (valid for ``/v1/completions``); with it,
    they are text of (about) the same number of tokens built from printable tokens, see
    :func:`text_of_length`.
    """
    if spec.kind not in ("random", "prefix"):
        raise ValueError(f"unknown dataset {spec.kind!r}: expected random or prefix")
    in_lens = sample_lengths(spec.input_len, spec.range_ratio, spec.num_prompts, rng)
    out_lens = sample_lengths(spec.output_len, spec.range_ratio, spec.num_prompts, rng)
    pool = text_token_ids(tokenizer, vocab_size) if tokenizer else range(1, vocab_size)
    prefixes: list[list[int]] = [[]]
    if spec.kind == "prefix":
        if not 0 < spec.prefix_len < spec.input_len or spec.num_prefixes < 1:
            raise ValueError("prefix dataset needs 0 < prefix_len < input_len and num_prefixes >= 1")
        prefixes = [random_ids(rng, spec.prefix_len, pool) for _ in range(spec.num_prefixes)]
    prefix_texts = [text_of_length(tokenizer, p, rng, pool) if tokenizer and p else ("", 0) for p in prefixes]
    prompts = []
    for i, (n_in, n_out) in enumerate(zip(in_lens, out_lens)):
        prefix = prefixes[i % len(prefixes)]
        suffix = random_ids(rng, max(1, n_in - len(prefix)), pool)
        if tokenizer is None:
            prompts.append(Prompt(prefix + suffix, len(prefix) + len(suffix), n_out))
            continue
        head, head_len = prefix_texts[i % len(prefixes)]
        tail, tail_len = text_of_length(tokenizer, suffix, rng, pool)
        prompts.append(Prompt(head + tail, head_len + tail_len, n_out))
    return prompts


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@dataclass
class RequestResult:
    """What one request measured. Times are seconds; ``itl_s`` holds gaps between streamed chunks."""

    request_id: str
    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None with fewer than two tokens."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_stats_ms(values_s: Iterable[float]) -> dict[str, float | None]:
    """Mean and percentiles in milliseconds; every field None when there are no values."""
    vals = [v * 1000.0 for v in values_s]
    keys = ["mean"] + [f"p{p}" for p in PERCENTILES]
    if not vals:
        return dict.fromkeys(keys)
    out: dict[str, float | None] = {"mean": sum(vals) / len(vals)}
    out.update({f"p{p}": percentile(vals, p) for p in PERCENTILES})
    return out


def meets_slo(r: RequestResult, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """A completed request meets its SLOs when TTFT and TPOT are within the given bounds.

    A request with a single output token has no TPOT and cannot miss a TPOT SLO.
    """
    if not r.ok or r.ttft_s is None:
        return False
    if slo_ttft_s is not None and r.ttft_s > slo_ttft_s:
        return False
    tpot = r.tpot_s
    return not (slo_tpot_s is not None and tpot is not None and tpot > slo_tpot_s)


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    *,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    tpot_sweep_s: Sequence[float] = (),
) -> dict[str, Any]:
    """Aggregate per-request results of a run that lasted ``duration_s`` seconds.

    ``tpot_sweep_s``: other TPOT bounds to report SLO attainment at (same TTFT bound), as ``attainment_by_tpot_ms``.
    """
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    in_tok = sum(r.prompt_len for r in done)
    out_tok = sum(r.output_tokens for r in done)
    has_slo = slo_ttft_s is not None or slo_tpot_s is not None
    good = sum(meets_slo(r, slo_ttft_s, slo_tpot_s) for r in done) if has_slo else None
    errors = Counter(r.error for r in failed)
    return {
        "completed": len(done),
        "failed": len(failed),
        "duration_s": duration_s,
        "input_tokens": in_tok,
        "output_tokens": out_tok,
        "request_throughput": len(done) / duration_s,
        "output_throughput": out_tok / duration_s,
        "total_token_throughput": (in_tok + out_tok) / duration_s,
        "ttft_ms": latency_stats_ms(r.ttft_s for r in done if r.ttft_s is not None),
        "tpot_ms": latency_stats_ms(t for t in (r.tpot_s for r in done) if t is not None),
        "itl_ms": latency_stats_ms(x for r in done for x in r.itl_s),
        "e2e_ms": latency_stats_ms(r.e2e_s for r in done),
        "slo": {
            "ttft_ms": None if slo_ttft_s is None else slo_ttft_s * 1000.0,
            "tpot_ms": None if slo_tpot_s is None else slo_tpot_s * 1000.0,
        },
        "goodput": None if good is None else good / duration_s,
        "slo_attainment": None if good is None or not results else good / len(results),
        "attainment_by_tpot_ms": {
            f"{t * 1000.0:g}": sum(meets_slo(r, slo_ttft_s, t) for r in done) / len(results) if results else None
            for t in tpot_sweep_s
        },
        "errors": dict(errors.most_common(MAX_ERROR_KINDS)),
    }


# ----------------------------------------------------------------------------------------------
# Sending requests
# ----------------------------------------------------------------------------------------------


def parse_sse_line(raw: bytes) -> dict[str, Any] | None:
    """The JSON object of one ``data:`` line; None for blank lines, comments and ``[DONE]``."""
    line = raw.decode("utf-8").strip()
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError("stream chunk is not a JSON object")
    return obj


async def sse_chunks(resp: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an SSE completion stream, in order; ``RuntimeError`` on an error event."""
    async for raw in resp.content:
        chunk = parse_sse_line(raw)
        if chunk is None:
            continue
        if "error" in chunk:
            raise RuntimeError(f"error in stream: {chunk['error']}")
        yield chunk


def _is_token_chunk(chunk: dict[str, Any]) -> bool:
    """True for a chunk that carries generated output (not the trailing usage-only chunk)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def _read_stream(resp: Any, result: RequestResult, start: float) -> None:
    """Consume an SSE completion stream, filling TTFT, ITL, token counts and e2e time."""
    last, chunks, usage_tokens = start, 0, None
    async for chunk in sse_chunks(resp):
        usage = chunk.get("usage")
        if usage:
            usage_tokens = usage.get("completion_tokens")
            result.prompt_len = usage.get("prompt_tokens") or result.prompt_len
        if _is_token_chunk(chunk):
            now = time.perf_counter()
            if result.ttft_s is None:
                result.ttft_s = now - start
            else:
                result.itl_s.append(now - last)
            last, chunks = now, chunks + 1
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = result.ttft_s is not None
    if not result.ok:
        result.error = "stream ended without output"


def completion_payload(model: str, prompt: Prompt) -> dict[str, Any]:
    """A streaming ``/v1/completions`` body asking for exactly ``prompt.output_len`` tokens."""
    return {
        "model": model,
        "prompt": prompt.prompt,
        "max_tokens": prompt.output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_completion(session: Any, base_url: str, model: str, prompt: Prompt, request_id: str) -> RequestResult:
    """Send one streaming completion; failures are recorded in the result (and logged), never raised."""
    import aiohttp

    result = RequestResult(request_id=request_id, prompt_len=prompt.prompt_len)
    start = time.perf_counter()
    try:
        async with session.post(
            f"{base_url}/v1/completions", json=completion_payload(model, prompt), headers={"X-Request-Id": request_id}
        ) as resp:
            if resp.status != 200:
                body = (await resp.text())[:200]
                result.error = f"HTTP {resp.status}: {body}"
            else:
                await _read_stream(resp, result, start)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as exc:
        result.ok = False
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    if not result.ok:
        log.warning("request %s failed: %s", request_id, result.error)
    return result


async def fetch_model_name(session: Any, base_url: str) -> str:
    """The first model id served at ``GET /v1/models``."""
    async with session.get(f"{base_url}/v1/models") as resp:
        resp.raise_for_status()
        body = await resp.json()
    models = body.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


# ----------------------------------------------------------------------------------------------
# The benchmark run
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    base_url: str
    model: str | None
    request_rate: float
    burstiness: float = 1.0
    fixed_rate: bool = False
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    seed: int = 0




async def fetch_metrics_text(session: Any, base_url: str) -> str | None:
    """The server's ``/metrics`` page, or ``None`` when it has none (or cannot be reached)."""
    try:
        async with session.get(f"{base_url}/metrics") as resp:
            if resp.status != 200:
                return None
            return await resp.text()
    except (OSError, asyncio.TimeoutError):
        return None


def server_stages() -> tuple[str, ...]:
    """The stages of the server's time breakdown, then ``ttft``: the router's own time to first token (from the
    request's arrival), which tells the server's share of the client's TTFT."""
    from splitserve.router.metrics import BREAKDOWN_STAGES

    return (*BREAKDOWN_STAGES, "ttft")


async def scrape_breakdown(session: Any, base_url: str) -> dict[str, tuple[float, float]] | None:
    """``{stage: (sum_s, count)}`` from the server's ``/metrics``; ``None`` when it does not expose the breakdown."""
    from prometheus_client.parser import text_string_to_metric_families

    stages = server_stages()
    text = await fetch_metrics_text(session, base_url)
    if text is None:
        return None
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        stage = family.name.removeprefix("splitserve_").removesuffix("_seconds")
        if stage in stages:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    found.setdefault(stage, [0.0, 0.0])[sample.name.endswith("_count")] = sample.value
    return {k: (v[0], v[1]) for k, v in found.items()} or None


def breakdown_ms(before: dict | None, after: dict | None) -> dict[str, float | None] | None:
    """Mean milliseconds per stage over the requests observed between two scrapes."""
    if before is None or after is None:
        return None
    out: dict[str, float | None] = {}
    for stage in server_stages():
        s0, n0 = before.get(stage, (0.0, 0.0))
        s1, n1 = after.get(stage, (0.0, 0.0))
        out[stage] = 1000.0 * (s1 - s0) / (n1 - n0) if n1 > n0 else None
    return out


async def run_requests(cfg: RunConfig, prompts: Sequence[Prompt]) -> tuple[str, list[RequestResult], float, Any]:
    """Send every prompt on the arrival schedule; returns (model, results, wall duration in seconds, the server's
    mean time breakdown per stage in ms, or None when it exposes none)."""
    import aiohttp

    offsets = arrival_offsets(
        len(prompts), cfg.request_rate, burstiness=cfg.burstiness, fixed=cfg.fixed_rate, rng=random.Random(cfg.seed)
    )
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        model = cfg.model or await fetch_model_name(session, cfg.base_url)

        async def one(i: int, prompt: Prompt, t0: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offsets[i] - time.perf_counter()))
            async with limit or contextlib.nullcontext():
                return await send_completion(session, cfg.base_url, model, prompt, f"bench-{cfg.seed}-{i}")

        before = await scrape_breakdown(session, cfg.base_url)
        start = time.perf_counter()
        results = await asyncio.gather(*(one(i, p, start) for i, p in enumerate(prompts)))
        duration = time.perf_counter() - start
        after = await scrape_breakdown(session, cfg.base_url)
    return model, list(results), duration, breakdown_ms(before, after)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to request (default: first of /v1/models)")
    parser.add_argument("--dataset", choices=("random", "prefix"), default="random", help="random token prompts, or prompts sharing a prefix")
    parser.add_argument("--input-len", type=int, default=1024, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="output tokens per request (max_tokens, ignore_eos)")
    parser.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [n*(1-r), n*(1+r)]")
    parser.add_argument("--prefix-len", type=int, default=None, help="prefix dataset: shared tokens (default input-len/2)")
    parser.add_argument("--num-prefixes", type=int, default=1, help="prefix dataset: number of distinct prefixes")
    parser.add_argument("--num-prompts", type=int, default=100, help="requests sent")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    parser.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson", help="inter-arrival times at --request-rate")
    parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of gaps (1 = Poisson)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no limit)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT bound of the SLO attainment line (default: none)")
    parser.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT bound of the SLO attainment line (default: none)")
    parser.add_argument("--slo-tpot-sweep-ms", default="",
                        help="comma-separated TPOT bounds to also report SLO attainment at (with the same TTFT bound)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir or builtin:... to send text prompts (default: none, token-id prompts)")
    parser.add_argument("--vocab-size", type=int, default=256, help="id range of token-id prompts without --tokenizer")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts and arrivals")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _build_prompts(args: argparse.Namespace) -> list[Prompt]:
    tok, vocab = None, args.vocab_size
    if args.tokenizer:
        from splitserve.core.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        vocab = tok.vocab_size
    spec = DatasetSpec(
        kind=args.dataset,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len if args.prefix_len is not None else args.input_len // 2,
        num_prefixes=args.num_prefixes,
    )
    return build_dataset(spec, random.Random(args.seed), vocab, tok)


def format_report(report: dict[str, Any]) -> str:
    """A human-readable table of :func:`summarize`'s output."""
    lines = [
        f"model {report['model']}  completed {report['completed']}  failed {report['failed']}  "
        f"duration {report['duration_s']:.2f} s",
        f"request throughput {report['request_throughput']:.3f} req/s  "
        f"output {report['output_throughput']:.1f} tok/s  total {report['total_token_throughput']:.1f} tok/s",
        f"{'metric':<8}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}  (ms)",
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        row = report[key]
        cells = "".join(f"{'-' if row[k] is None else format(row[k], '.2f'):>10}" for k in ("mean", "p50", "p90", "p99"))
        lines.append(f"{key[:-3]:<8}{cells}")
    if report["goodput"] is not None:
        lines.append(f"goodput {report['goodput']:.3f} req/s  SLO attainment {report['slo_attainment']:.1%}")
    for bound, share in report.get("attainment_by_tpot_ms", {}).items():
        lines.append(f"SLO attainment with TPOT <= {bound} ms: {share:.1%}")
    if report.get("server_breakdown_ms"):
        parts = [f"{k} {'-' if v is None else format(v, '.1f')}" for k, v in report["server_breakdown_ms"].items()]
        lines.append("server time breakdown, mean ms per request: " + ", ".join(parts))
    lines.extend(f"error x{n}: {msg}" for msg, n in report["errors"].items())
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    prompts = _build_prompts(args)
    cfg = RunConfig(
        base_url=args.url.rstrip("/"),
        model=args.model,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        fixed_rate=args.arrival == "fixed",
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout_s,
        seed=args.seed,
    )
    model, results, duration, breakdown = asyncio.run(run_requests(cfg, prompts))
    slo_ttft = None if args.slo_ttft_ms is None else args.slo_ttft_ms / 1000.0
    slo_tpot = None if args.slo_tpot_ms is None else args.slo_tpot_ms / 1000.0
    report = {"model": model, "dataset": args.dataset, "request_rate": args.request_rate,
              "num_prompts": len(prompts), "max_concurrency": args.max_concurrency}
    sweep = [float(x) / 1000.0 for x in args.slo_tpot_sweep_ms.split(",") if x.strip()]
    report.update(summarize(results, duration, slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, tpot_sweep_s=sweep))
    report["server_breakdown_ms"] = breakdown
    if args.json:
        # json.dumps writes inf as Infinity (not JSON); report rate inf as null
        report["request_rate"] = None if math.isinf(args.request_rate) else args.request_rate
        print(json.dumps(report))
    else:
        print(format_report(report))
    sys.stdout.flush()
    return 0 if report["completed"] > 0 else 1
