"""``splitserve bench agent``: a multi-turn agent trace against any OpenAI-compatible server (issue 11).

1. :func:`build_script` draws, from the seed alone, each session's texts and pauses: a context shared by every
   session (a system prompt and tool schemas; ``--shared-words``) behind a per-run salt, then per turn new user or tool
   text (``--turn-words``; whole sentences ending mid-sentence, so the model continues rather than ends the text), and between turns a tool pause from a heavy-tailed distribution (``--pause-dist``
   lognormal or pareto, ``--pause-scale`` seconds, capped at ``--max-pause-s``): most short, a few long.
2. :func:`run_trace` runs ``--sessions`` sessions concurrently, ``--turns`` turns each. Every turn sends the whole
   conversation so far (the previous turns' outputs included) as one streaming greedy completion; with sessions on it
   carries ``session_id`` (and the ``X-Session-Id`` header), ``expected_return_s`` (the pause actually drawn, with
   ``--hints``) and ``session_end`` on the last turn. It measures each turn's TTFT and keeps its text, and asks
   for the stream's usage (``stream_options.include_usage``): each turn's prompt tokens less the part the server
   served from cache (``usage.prompt_tokens_details.cached_tokens``, as vLLM and SplitServe report it) are the
   tokens it computed.
3. Before and after, the server's ``/metrics`` is read when it has SplitServe's worker counters: prompt tokens
   prefilled (``splitserve_worker_prefill_tokens_total``, prefill workers and decode workers' local prefills) and
   session hits / tokens reused; and its time breakdown (mean ms per request of each stage: prefill queue and
   compute, transfer, join for disaggregated turns; ``local_prefill`` for turns prefilled on the decode worker).
4. :func:`summarize` reports TTFT percentiles of turn 1 and of turns 2+, the tokens prefilled (server counters,
   all turns) and the prompt tokens turns 2+ computed (from usage: where sessions can help; turn 1 is the same work
   with sessions on or off).
4'. ``--server-log``: the router's log (SplitServe's access lines carry each response's id and the router's own TTFT)
   is read after each run, and each turn's server-side TTFT is found by the response id its stream carried: the
   TTFT percentiles again without the client's share (its event loop, its parsing of every other stream).
   ``--client-procs N`` spreads the sessions over N client processes (each with its own event loop, uvloop where
   installed), so that one process parsing every stream does not delay the first tokens it times.
5. ``--compare``: a sessions-on run, a sessions-off run with another salt (measured: no cache left by the first run
   helps it), then the sessions-on run's conversations replayed without sessions and without pauses; every turn's
   text must equal the sessions-on run's (greedy). ``--sessions-off`` runs only without sessions.
6. ``--token-ids``: prompts are token-id lists, for models whose text does not re-tokenize to the ids they generated
   (dummy random-weight models). Step 1 then draws ids in [``--id-low``, ``--vocab-size``) instead of words: the
   shared context is ``--shared-tokens`` ids drawn from the seed and the salt (so runs with another salt share no
   prefix), then ``--own-tokens`` ids of context each session has alone (a task, a repository: drawn from the seed,
   the salt and the session), each turn's new user/tool text ``--turn-tokens`` ids (:func:`build_token_script`); step 2 asks
   ``return_token_ids`` and appends the streamed ``token_ids`` to the conversation; step 5 compares id lists.

Top-level imports stay light (aiohttp is imported where requests are sent).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from splitserve.benchmarks.serve import (breakdown_ms, fetch_metrics_text, fetch_model_name, latency_stats_ms,
                                         scrape_breakdown, sse_chunks)

log = logging.getLogger(__name__)

SENTENCES = (
    "Lily went to the park with her mom.", "She saw a big red ball under a tree.", "Tom wanted to play with the ball.",
    "The sun was warm and the sky was blue.", "A little dog ran to them and barked.", "They laughed and played all day.",
    "Then they found a small green box.", "Inside the box was a shiny key.", "Mom said they could keep it.",
    "A bird sang a happy song in the tree.", "The cat jumped over the fence.", "Dad made a big cake for everyone.",
    "It started to rain, so they ran home.", "Ben had a new blue car.", "The old man smiled at the children.",
)
OPEN_ENDS = ("Then", "One day,", "After that,", "So", "But then", "The next day,")
"""Each turn's new text ends mid-sentence, so the model continues the story instead of ending it."""
COUNTERS = {"prefill_tokens": "splitserve_worker_prefill_tokens_total",
            "session_hits": "splitserve_worker_session_hits_total",
            "session_tokens_reused": "splitserve_worker_session_tokens_reused_total"}


@dataclass(frozen=True)
class AgentConfig:
    base_url: str
    model: str | None = None
    sessions: int = 4
    turns: int = 3
    shared_words: int = 40
    turn_words: int = 12
    max_tokens: int = 16
    pause_dist: str = "lognormal"
    pause_scale: float = 1.0
    """Median pause (lognormal) or the smallest pause (pareto), seconds."""
    pause_shape: float = 1.5
    """Lognormal sigma, or the Pareto tail index (smaller: heavier tail)."""
    max_pause_s: float = 300.0
    hints: bool = False
    seed: int = 0
    timeout_s: float = 600.0
    token_ids: bool = False
    """Module flow, step 6: prompts are token ids (the fields below apply only then)."""
    shared_tokens: int = 64
    own_tokens: int = 0
    """Ids of context each session has alone, after the shared ones."""
    turn_tokens: int = 16
    id_low: int = 10
    """Lowest id drawn (the ids below are mostly special tokens)."""
    vocab_size: int = 32000
    """Ids are drawn below it."""
    client_procs: int = 1
    """Client processes the sessions are spread over (module flow, step 4')."""
    server_log: str | None = None
    """The router's log, for each turn's server-side TTFT (module flow, step 4')."""


class TurnStep(NamedTuple):
    """How a decode worker runs a held session turn's step (the worker flags of the same names)."""

    overlap_prefill: bool
    """Queued behind the step in flight, instead of run after it has completed."""
    step_window: bool
    """The worker waits for arrivals before it launches a decode step."""
    prefill_first_tokens: int = 0
    """Short prompts run in a step of their own, ahead of the decode rows (0: with them)."""
    prompt_lane: bool = False
    """Those steps run on a high-priority stream while the decode step in flight runs on (core/engine/lane.py)."""
    capture_mixed_graphs: bool = False
    """Warm-up captures every mixed graph (a turn joining decode rows never waits for a capture while serving)."""


PREFILL_FIRST_TOKENS = 256
"""The ``prefill_first_tokens`` the benchmarks try: a turn's new text and last generated token fit it."""
TURN_STEPS = {
    "synchronous": TurnStep(False, False),  # after the step in flight has completed (the baseline)
    "queued": TurnStep(True, False),  # queued behind the step in flight
    "queued_window": TurnStep(True, True),  # queued, the worker waiting for arrivals before it launches a decode step
    "prefill_first": TurnStep(True, True, PREFILL_FIRST_TOKENS),  # as queued_window, in a step without decode rows
    "prompt_lane": TurnStep(True, True, PREFILL_FIRST_TOKENS, True),  # as prefill_first, not queued behind the step
    "lane_all_graphs": TurnStep(True, True, PREFILL_FIRST_TOKENS, True, True),  # as prompt_lane, no capture serving
}
"""The settings the GPU benchmarks compare (bench_engine_gpu in the engine loop, bench_agent_gpu in serving)."""
TOKEN_FIELDS = ("token_ids", "shared_tokens", "own_tokens", "turn_tokens", "id_low", "vocab_size")
""":class:`AgentConfig` fields of ``--token-ids``, in the report's config only in that mode."""


@dataclass
class Script:
    """One session's trace: its opening, the new text of each turn, and the pause after each turn (text, or token-id
    lists with ``--token-ids``)."""

    session_id: str
    opening: str | list[int]
    turn_texts: list[str] | list[list[int]]
    pauses: list[float]


@dataclass
class TurnResult:
    session_id: str
    turn: int
    prompt: str | list[int]
    ok: bool = False
    text: str = ""
    ttft_s: float | None = None
    error: str = ""
    token_ids: list[int] = field(default_factory=list)
    """The generated ids (``--token-ids`` only: the stream's ``token_ids``)."""
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    """From the stream's usage chunk, when the server sends one (``cached_tokens`` 0 when it reports no details)."""
    response_id: str | None = None
    """The ``id`` of the stream's chunks (the router's access log names the request by it)."""


def draw_pause(rng: random.Random, cfg: AgentConfig) -> float:
    """A heavy-tailed tool pause in seconds (0 when ``pause_scale`` is 0)."""
    if cfg.pause_scale <= 0:
        return 0.0
    if cfg.pause_dist == "pareto":
        pause = cfg.pause_scale * rng.paretovariate(cfg.pause_shape)
    else:
        pause = rng.lognormvariate(math.log(cfg.pause_scale), cfg.pause_shape)
    return min(pause, cfg.max_pause_s)


def _sentences(rng: random.Random, words: int) -> str:
    """Whole sentences until about ``words`` words."""
    out: list[str] = []
    while sum(len(x.split()) for x in out) < words:
        out.append(rng.choice(SENTENCES))
    return " ".join(out)


def _text(rng: random.Random, words: int) -> str:
    """New text of one turn: sentences, then an open ending."""
    return f"{_sentences(rng, words)} {rng.choice(OPEN_ENDS)}"


def build_script(cfg: AgentConfig, salt: str) -> list[Script]:
    """Every session's texts and pauses, from ``cfg.seed`` alone; ``salt`` opens the shared context."""
    if cfg.token_ids:
        return build_token_script(cfg, salt)
    shared = f"{salt}. {_sentences(random.Random(f'{cfg.seed}/shared'), cfg.shared_words)}"
    scripts = []
    for i in range(cfg.sessions):
        rng = random.Random(f"{cfg.seed}/session/{i}")
        opening = f"{shared} Once upon a time, agent {i} said: {_text(rng, cfg.turn_words)}"
        texts = [""] + [f" {_text(rng, cfg.turn_words)}" for _ in range(cfg.turns - 1)]  # the opening is turn 1's
        pauses = [draw_pause(rng, cfg) for _ in range(cfg.turns - 1)] + [0.0]
        scripts.append(Script(_session_id(cfg, salt, i), opening, texts, pauses))
    return scripts


def _session_id(cfg: AgentConfig, salt: str, i: int) -> str:
    return f"agent-{cfg.seed}-{salt.replace(' ', '-')}-{i}"


def _ids(rng: random.Random, cfg: AgentConfig, n: int) -> list[int]:
    """``n`` random token ids in [``id_low``, ``vocab_size``)."""
    return [rng.randrange(cfg.id_low, cfg.vocab_size) for _ in range(n)]


def build_token_script(cfg: AgentConfig, salt: str) -> list[Script]:
    """:func:`build_script` in token ids (module flow, step 6): the shared context is drawn from the seed and
    ``salt``, each session's ids and pauses from the seed alone."""
    shared = _ids(random.Random(f"{cfg.seed}/shared-ids/{salt}"), cfg, cfg.shared_tokens)
    scripts = []
    for i in range(cfg.sessions):
        rng = random.Random(f"{cfg.seed}/session/{i}")
        own = _ids(random.Random(f"{cfg.seed}/own-ids/{salt}/{i}"), cfg, cfg.own_tokens)
        opening = shared + own + _ids(rng, cfg, cfg.turn_tokens)
        turns: list[list[int]] = [[]] + [_ids(rng, cfg, cfg.turn_tokens) for _ in range(cfg.turns - 1)]
        pauses = [draw_pause(rng, cfg) for _ in range(cfg.turns - 1)] + [0.0]
        scripts.append(Script(_session_id(cfg, salt, i), opening, turns, pauses))
    return scripts


def salt_for(seed: int, label: str) -> str:
    """Opening words that differ between runs, so that no cache one run left helps another."""
    rng = random.Random(f"{seed}/salt/{label}")
    return "Run " + " ".join(rng.choice(SENTENCES).split()[rng.randrange(4)] for _ in range(3))


async def stream_turn(http: Any, cfg: AgentConfig, model: str, result: TurnResult, session: dict | None) -> None:
    """One streaming greedy completion; fills ``result`` (failures recorded, never raised)."""
    import aiohttp

    body = {"model": model, "prompt": result.prompt, "max_tokens": cfg.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(session or {})}
    if cfg.token_ids:
        body["return_token_ids"] = True
    headers = {"X-Session-Id": session["session_id"]} if session else {}
    start, parts = time.perf_counter(), []
    try:
        async with http.post(f"{cfg.base_url}/v1/completions", json=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for chunk in sse_chunks(resp):
                result.response_id = result.response_id or chunk.get("id")
                for choice in chunk.get("choices") or []:
                    output = choice.get("text") or (cfg.token_ids and choice.get("token_ids"))
                    if output and result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    parts.append(choice.get("text") or "")
                    result.token_ids.extend(choice.get("token_ids") or ())
                _read_usage(chunk, result)
        result.text, result.ok = "".join(parts), True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, RuntimeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:200]
    if not result.ok:
        log.warning("session %s turn %d failed: %s", result.session_id, result.turn, result.error)


def _read_usage(chunk: dict, result: TurnResult) -> None:
    usage = chunk.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        result.prompt_tokens = usage["prompt_tokens"]
        result.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


async def run_session(http: Any, cfg: AgentConfig, model: str, script: Script, sessions_on: bool,
                      pauses_on: bool) -> list[TurnResult]:
    """The session's turns in order; a failed turn ends the session (later turns would build on nothing)."""
    results, text = [], script.opening
    for turn in range(cfg.turns):
        text = text + script.turn_texts[turn]  # a new str or list: each result keeps its own prompt
        result = TurnResult(script.session_id, turn + 1, text)
        session = None
        if sessions_on:
            session = {"session_id": script.session_id, "session_end": turn == cfg.turns - 1}
            if cfg.hints and turn < cfg.turns - 1:
                session["expected_return_s"] = script.pauses[turn]
        await stream_turn(http, cfg, model, result, session)
        results.append(result)
        if not result.ok:
            break
        text = text + (result.token_ids if cfg.token_ids else result.text)
        if pauses_on and script.pauses[turn] > 0:
            await asyncio.sleep(script.pauses[turn])
    return results


async def scrape_counters(http: Any, base_url: str) -> dict[str, float] | None:
    """SplitServe's worker counters summed over workers; ``None`` when ``/metrics`` has none of them."""
    text = await fetch_metrics_text(http, base_url)
    if text is None:
        return None
    out: dict[str, float] = {}
    for key, metric in COUNTERS.items():
        values = re.findall(rf"^{metric}(?:\{{[^}}]*\}})?\s+(\S+)$", text, re.M)
        if values:
            out[key] = sum(float(v) for v in values)
    return out or None


async def run_trace(cfg: AgentConfig, sessions_on: bool, salt: str, pauses_on: bool = True) -> dict[str, Any]:
    """One run of the whole trace: every turn's result, the wall time and the server counters' change."""
    import aiohttp

    scripts = build_script(cfg, salt)
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as http:
        model = cfg.model or await fetch_model_name(http, cfg.base_url)
        before = await scrape_counters(http, cfg.base_url)
        stages_before = await scrape_breakdown(http, cfg.base_url)
        if cfg.client_procs > 1:
            results, duration = await _sessions_in_processes(cfg, model, scripts, sessions_on, pauses_on)
        else:
            results, duration = await run_sessions(cfg, model, scripts, sessions_on, pauses_on, http)
        stages = breakdown_ms(stages_before, await scrape_breakdown(http, cfg.base_url))
        after = await _settled_counters(http, cfg.base_url, before)
    counters = None
    if before is not None and after is not None:
        counters = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in COUNTERS}
    return {"model": model, "results": results, "duration_s": duration, "counters": counters, "breakdown_ms": stages}


async def run_sessions(cfg: AgentConfig, model: str, scripts: list[Script], sessions_on: bool, pauses_on: bool,
                       http: Any = None) -> tuple[list[TurnResult], float]:
    """``scripts``' sessions run concurrently (on ``http``, else on a client session of their own); their turns'
    results and the wall time they took."""
    import aiohttp

    if http is None:
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as own:
            return await run_sessions(cfg, model, scripts, sessions_on, pauses_on, own)
    start = time.perf_counter()
    per_session = await asyncio.gather(*(run_session(http, cfg, model, s, sessions_on, pauses_on) for s in scripts))
    return [r for rs in per_session for r in rs], time.perf_counter() - start


def _sessions_in_process(cfg: AgentConfig, model: str, scripts: list[Script], sessions_on: bool,
                         pauses_on: bool) -> tuple[list[TurnResult], float]:
    """A client process's share of the sessions (module flow, step 4')."""
    return run_loop(run_sessions(cfg, model, scripts, sessions_on, pauses_on))


async def _sessions_in_processes(cfg: AgentConfig, model: str, scripts: list[Script], sessions_on: bool,
                                 pauses_on: bool) -> tuple[list[TurnResult], float]:
    """Every ``client_procs``-th session in each of ``client_procs`` processes; the wall time is the longest share's
    (a process's start-up not counted)."""
    import concurrent.futures
    import multiprocessing

    loop = asyncio.get_running_loop()
    procs = min(cfg.client_procs, len(scripts))
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        shares = await asyncio.gather(*(
            loop.run_in_executor(pool, _sessions_in_process, cfg, model, scripts[i::procs], sessions_on, pauses_on)
            for i in range(procs)))
    return [r for rs, _ in shares for r in rs], max(d for _, d in shares)


def run_loop(coro: Any) -> Any:
    """Run ``coro`` on uvloop where it is installed (a cheaper event loop for a client timing many streams)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _settled_counters(http: Any, base_url: str, before: dict | None) -> dict[str, float] | None:
    """Counters after the run, read until two reads a heartbeat apart agree (workers report them every second)."""
    if before is None:
        return None
    last = await scrape_counters(http, base_url)
    for _ in range(20):
        await asyncio.sleep(1.0)
        now = await scrape_counters(http, base_url)
        if now == last:
            return now
        last = now
    return last


ACCESS_TTFT = re.compile(r"\baccess id=(\S+) .*?\bttft_ms=([0-9.]+)")
"""A SplitServe router's access line: the response id and the router's own TTFT (router/app.py)."""


def server_ttfts(path: str) -> dict[str, float]:
    """Response id -> the router's TTFT (seconds), from the access lines of its log at ``path``."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return {m.group(1): float(m.group(2)) / 1e3 for m in map(ACCESS_TTFT.search, f) if m is not None}


def summarize(run: dict[str, Any], server: dict[str, float] | None = None) -> dict[str, Any]:
    """TTFT of turn 1 and of turns 2+ (ms), failures and the server counters of one run; with ``server`` (response
    id -> the router's TTFT), the router's TTFT percentiles of the same turns too."""
    results = run["results"]
    ok = [r for r in results if r.ok and r.ttft_s is not None]
    summary = {
        "turns_ok": len(ok), "turns_failed": sum(1 for r in results if not r.ok),
        "duration_s": round(run["duration_s"], 3),
        "ttft_turn1_ms": latency_stats_ms(r.ttft_s for r in ok if r.turn == 1),
        "ttft_later_ms": latency_stats_ms(r.ttft_s for r in ok if r.turn > 1),
        "server": run["counters"],
        "computed_later": _computed(r for r in ok if r.turn > 1),
        "server_breakdown_ms": run["breakdown_ms"],
        "errors": sorted({r.error for r in results if not r.ok})[:10],
    }
    if server is not None:
        found = [(r.turn, server[r.response_id]) for r in ok if r.response_id in server]
        summary.update({"server_ttft_turns": len(found),
                        "server_ttft_turn1_ms": latency_stats_ms(t for turn, t in found if turn == 1),
                        "server_ttft_later_ms": latency_stats_ms(t for turn, t in found if turn > 1)})
    return summary


def _computed(results: Any) -> dict[str, int] | None:
    """Prompt tokens and the part computed (not served from cache) over ``results``; ``None`` without usage."""
    with_usage = [r for r in results if r.prompt_tokens is not None]
    if not with_usage:
        return None
    prompt = sum(r.prompt_tokens for r in with_usage)
    return {"turns": len(with_usage), "prompt_tokens": prompt,
            "computed_tokens": prompt - sum(r.cached_tokens or 0 for r in with_usage)}


def compare_texts(a: list[TurnResult], b: list[TurnResult], token_ids: bool = False) -> list[str]:
    """``session/turn`` of every turn whose text (``token_ids``: generated ids) differs between two runs of the same
    script (or is missing, or failed)."""
    other = {(r.session_id, r.turn): r for r in b}

    def output(r: TurnResult) -> str | list[int]:
        return r.token_ids if token_ids else r.text

    return [f"{r.session_id}/{r.turn}" for r in a
            if (r.session_id, r.turn) not in other or output(other[(r.session_id, r.turn)]) != output(r)
            or not r.ok or not other[(r.session_id, r.turn)].ok]


def run_all(cfg: AgentConfig, mode: str) -> dict[str, Any]:
    """``mode``: ``on``, ``off`` or ``compare`` (on, off with another salt, then on's script replayed off)."""
    skip = {"base_url", *(() if cfg.token_ids else TOKEN_FIELDS)}
    report: dict[str, Any] = {"config": {k: v for k, v in vars(cfg).items() if k not in skip}, "mode": mode}
    if mode in ("on", "compare"):
        on = run_loop(run_trace(cfg, True, salt_for(cfg.seed, "on")))
        report["model"], report["sessions_on"] = on["model"], _summary(cfg, on)
    if mode in ("off", "compare"):
        off = run_loop(run_trace(cfg, False, salt_for(cfg.seed, "off")))
        report["model"], report["sessions_off"] = off["model"], _summary(cfg, off)
    if mode == "compare":
        replay = run_loop(run_trace(cfg, False, salt_for(cfg.seed, "on"), pauses_on=False))
        mismatches = compare_texts(on["results"], replay["results"], cfg.token_ids)
        report["outputs_match"], report["mismatches"] = not mismatches, mismatches[:20]
        report["mismatch_count"] = len(mismatches)
        report["speedup"] = _speedups(report["sessions_on"], report["sessions_off"])
    return report


def _summary(cfg: AgentConfig, run: dict[str, Any]) -> dict[str, Any]:
    return summarize(run, server_ttfts(cfg.server_log) if cfg.server_log else None)


def _speedups(on: dict[str, Any], off: dict[str, Any]) -> dict[str, float | None]:
    p50_on, p50_off = on["ttft_later_ms"]["p50"], off["ttft_later_ms"]["p50"]
    pre_on = (on["server"] or {}).get("prefill_tokens")
    pre_off = (off["server"] or {}).get("prefill_tokens")
    later_on = (on["computed_later"] or {}).get("computed_tokens")
    later_off = (off["computed_later"] or {}).get("computed_tokens")
    server_on, server_off = on.get("server_ttft_later_ms") or {}, off.get("server_ttft_later_ms") or {}
    return {"ttft_later_p50_x": _ratio(p50_off, p50_on), "prefill_tokens_x": _ratio(pre_off, pre_on),
            "computed_later_x": _ratio(later_off, later_on),
            "server_ttft_later_p50_x": _ratio(server_off.get("p50"), server_on.get("p50"))}


def _ratio(num: float | None, den: float | None) -> float | None:
    return round(num / den, 2) if num and den else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to request (default: first of /v1/models)")
    parser.add_argument("--sessions", type=int, default=4, help="concurrent agent sessions")
    parser.add_argument("--turns", type=int, default=3, help="turns per session")
    parser.add_argument("--shared-words", type=int, default=40, help="words of context every session shares")
    parser.add_argument("--turn-words", type=int, default=12, help="new user/tool words per turn")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn (ignore_eos)")
    parser.add_argument("--pause-dist", choices=("lognormal", "pareto"), default="lognormal", help="heavy-tailed distribution of tool pauses")
    parser.add_argument("--pause-scale", type=float, default=1.0,
                        help="seconds: lognormal median or pareto minimum of tool pauses (0: no pauses)")
    parser.add_argument("--pause-shape", type=float, default=1.5, help="lognormal sigma or pareto tail index")
    parser.add_argument("--max-pause-s", type=float, default=300.0, help="longest tool pause drawn")
    parser.add_argument("--hints", action="store_true", help="send expected_return_s (the pause drawn) each turn")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sessions-off", action="store_true", help="run without session ids")
    mode.add_argument("--compare", action="store_true",
                      help="sessions on, then off (measured), then on's conversations replayed off: texts (with "
                           "--token-ids: generated ids) must match")
    tokens = parser.add_argument_group("token-id prompts (for models whose text does not re-tokenize to its ids)")
    tokens.add_argument("--token-ids", action="store_true",
                        help="prompts are random token ids; each turn appends the ids generated (return_token_ids)")
    tokens.add_argument("--shared-tokens", type=int, default=64, help="ids of context every session shares")
    tokens.add_argument("--own-tokens", type=int, default=0,
                        help="ids of context each session has alone, after the shared ones")
    tokens.add_argument("--turn-tokens", type=int, default=16, help="new user/tool ids per turn")
    tokens.add_argument("--id-low", type=int, default=10, help="lowest id drawn (avoids the low special ids)")
    tokens.add_argument("--vocab-size", type=int, default=32000, help="ids are drawn below it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per-request timeout")
    parser.add_argument("--client-procs", type=int, default=1,
                        help="client processes the sessions are spread over, one event loop each (default 1)")
    parser.add_argument("--server-log", default=None,
                        help="the SplitServe router's log: adds the router's own TTFT of each turn, found by "
                             "response id in its access lines (default: none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model {report.get('model')}  mode {report['mode']}"]
    for key in ("sessions_on", "sessions_off"):
        run = report.get(key)
        if run is None:
            continue
        t1, t2 = run["ttft_turn1_ms"], run["ttft_later_ms"]
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"{key:<13} turns ok {run['turns_ok']} failed {run['turns_failed']}  "
                     f"TTFT turn 1 p50 {fmt(t1['p50'])} p90 {fmt(t1['p90'])} ms  "
                     f"turns 2+ p50 {fmt(t2['p50'])} p90 {fmt(t2['p90'])} ms  "
                     f"prefill tokens {'-' if not run['server'] else int(run['server']['prefill_tokens'])}  "
                     f"computed by turns 2+ {(run['computed_later'] or {}).get('computed_tokens', '-')}")
        if "server_ttft_later_ms" in run:
            s1, s2 = run["server_ttft_turn1_ms"], run["server_ttft_later_ms"]
            lines.append(f"{'':<13} router's TTFT ({run['server_ttft_turns']} turns found in its log): turn 1 p50 "
                         f"{fmt(s1['p50'])} ms  turns 2+ p50 {fmt(s2['p50'])} p90 {fmt(s2['p90'])} ms")
        lines.extend(f"  error: {e}" for e in run["errors"])
    if "outputs_match" in report:
        lines.append(f"outputs match a session-less run: {report['outputs_match']}  speedups {report['speedup']}")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    if args.sessions < 1 or args.turns < 1 or args.client_procs < 1:
        raise ValueError("--sessions, --turns and --client-procs must be >= 1")
    if args.token_ids and not 0 <= args.id_low < args.vocab_size:
        raise ValueError("--id-low must be >= 0 and below --vocab-size")
    counts = (args.shared_tokens, args.own_tokens, args.turn_tokens)
    if args.token_ids and (min(counts) < 0 or sum(counts) < 1):
        raise ValueError("--shared-tokens, --own-tokens and --turn-tokens must be >= 0, and not all 0")
    return AgentConfig(
        base_url=args.url.rstrip("/"), model=args.model, sessions=args.sessions, turns=args.turns,
        shared_words=args.shared_words, turn_words=args.turn_words, max_tokens=args.max_tokens,
        pause_dist=args.pause_dist, pause_scale=args.pause_scale, pause_shape=args.pause_shape,
        max_pause_s=args.max_pause_s, hints=args.hints, seed=args.seed, timeout_s=args.timeout_s,
        token_ids=args.token_ids, shared_tokens=args.shared_tokens, own_tokens=args.own_tokens,
        turn_tokens=args.turn_tokens,
        id_low=args.id_low, vocab_size=args.vocab_size, client_procs=args.client_procs, server_log=args.server_log,
    )


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    mode = "compare" if args.compare else ("off" if args.sessions_off else "on")
    report = run_all(cfg, mode)
    print(json.dumps(report) if args.json else format_report(report))
    sys.stdout.flush()
    runs = [report[k] for k in ("sessions_on", "sessions_off") if k in report]
    failed = any(r["turns_failed"] for r in runs) or report.get("outputs_match") is False
    return 1 if failed else 0
