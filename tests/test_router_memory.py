"""The router keeps nothing per finished request, and its tokenizer's native memory stays within a bound (issue 12's
soak: router RSS grew about 3 KB per request).

The growth was the Hugging Face tokenizers BPE encode cache: since tokenizers 0.23 it is thread-local, up to 10,000
entries in each thread that encodes, and the router tokenizes on four threads, so it kept up to 40,000 whole soak
prompts (the built-in tokenizer has no pre-tokenizer) of about 4 KB each, native memory that tracemalloc does not
see (benchmarks/RESULTS.md, soak section). ``test_tokenizer_memory_stops_growing``:

1. A real router process (no worker needed for ``/tokenize``).
2. 3,000 distinct prompts of 200-250 bytes (each cacheable, about 8 KB cached) through ``/tokenize``, 8 at a time so
   every tokenizer thread works: the caches fill up to their bound. Its anonymous RSS is read.
3. 2,000 more distinct prompts: the RSS grows by less than 5 MB (with the library's per-thread default it grew by
   about 15 MB; with any per-request leak over ~2.5 KB it would too). The ids are the tokenizer's.

``test_nothing_is_kept_per_finished_request`` checks the router's own state:

1. The router app runs in this process (its state can be read), one scripted worker process behind it.
2. It serves finished, streamed-and-abandoned, refused (400, 404) and session requests, and requests to unknown
   paths, with the bounds of the abort memory and the session map made small.
3. Then: no request stream, no in-flight count, no per-worker load left; the abort memory and the session map at
   most their bounds, ended sessions gone; the request counter's label sets only the fixed routes and ``other``.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))
from fakes.router_harness import REPO, WORKER_SCRIPT, RouterHarness  # noqa: E402

from splitserve.core.config import RouterConfig  # noqa: E402
from splitserve.core.tokenizer import load_tokenizer  # noqa: E402
from splitserve.router import control, service  # noqa: E402
from splitserve.router.app import _ENDPOINTS, create_app, runner_options  # noqa: E402
from splitserve.router.service import SERVICE  # noqa: E402

MODEL = "builtin:tiny-random-llama"
TOK = load_tokenizer(MODEL)
SCRIPT = TOK.encode(" Hello world!", add_special_tokens=False)
ABORTED_BOUND, SESSIONS_BOUND = 4, 3


async def _wait(pred, what: str, timeout_s: float = 30.0) -> None:
    """Poll ``pred`` (a bound on a hang, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def _traffic(session: aiohttp.ClientSession, url: str) -> None:
    """Module flow, step 2."""
    for i in range(12):
        async with session.post(url + "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 3}) as r:
            assert r.status == 200, await r.text()
    for i in range(8):  # streams the client leaves after the first chunk: the router aborts them
        async with session.post(url + "/v1/completions",
                                json={"prompt": f"s{i}", "max_tokens": 200, "stream": True}) as r:
            assert r.status == 200
            await r.content.readline()
    for body in ({"prompt": "x", "temperature": -1}, {"prompt": "x", "model": "nope"}, {"prompt": 5}):
        async with session.post(url + "/v1/completions", json=body) as r:
            assert r.status in (400, 404)
    for i in range(6):
        async with session.get(url + f"/no/such/route/{i}") as r:
            assert r.status == 404
    for sid in range(5):  # sessions 0-1 end; 2-4 stay, over a bound of 3 with the ended ones
        for turn in range(2):
            body = {"prompt": f"t{turn}", "max_tokens": 2, "session_id": f"s-{sid}",
                    "session_end": turn == 1 and sid < 2}
            async with session.post(url + "/v1/completions", json=body) as r:
                assert r.status == 200, await r.text()


def _label_sets(svc: service.RouterService) -> set[str]:
    return {s.labels["endpoint"] for metric in svc.metrics.requests.collect() for s in metric.samples}


def test_nothing_is_kept_per_finished_request(tmp_path, monkeypatch):
    monkeypatch.setattr(control, "ABORTED_MEMORY", ABORTED_BOUND)
    monkeypatch.setattr(service, "MAX_SESSIONS", SESSIONS_BOUND)

    async def run() -> None:
        cfg = RouterConfig(model=MODEL, control_port=0, heartbeat_timeout_s=600)
        app = create_app(cfg, TOK)
        runner = web.AppRunner(app, **runner_options(cfg))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        svc = app[SERVICE]
        worker = subprocess.Popen([sys.executable, str(WORKER_SCRIPT), "--router", svc.control.address,
                                   "--worker-id", "w", "--tokens", ",".join(map(str, SCRIPT)),
                                   "--log", str(tmp_path / "w.jsonl"), "--token-delay", "0.02",
                                   "--vocab-size", str(TOK.vocab_size)], cwd=REPO,
                                  stderr=open(tmp_path / "w.err", "w"))
        try:
            await _wait(svc.healthy, "the scripted worker to register")
            async with aiohttp.ClientSession() as session:
                await _traffic(session, f"http://127.0.0.1:{runner.addresses[0][1]}")
            await _wait(lambda: svc.inflight == 0 and not svc.control.streams, "requests to finish")
            w = svc.registry.get("w")
            assert (w.inflight, w.pending_prefill_tokens) == (0, 0)
            assert 0 < len(svc.control._aborted) <= ABORTED_BOUND
            assert len(svc.sessions) <= SESSIONS_BOUND and not {"s-0", "s-1"} & set(svc.sessions)
            assert _label_sets(svc) <= set(_ENDPOINTS) | {"other"} and "other" in _label_sets(svc)
            assert svc.metrics.history.maxlen is not None
        finally:
            worker.terminate()
            worker.wait(30)
            await runner.cleanup()

    asyncio.run(run())


@pytest.mark.parametrize("path", ["/v1/completions", "/x/../v1/completions", "/metrics?x=1"])
def test_request_counter_labels_are_a_fixed_set(path):
    from splitserve.router.app import _endpoint_label

    class _Req:
        def __init__(self, p: str) -> None:
            self.path = p.split("?")[0]

    assert _endpoint_label(_Req(path)) in set(_ENDPOINTS) | {"other"}


FILL_PROMPTS, MORE_PROMPTS, GROWTH_LIMIT_MB = 3000, 2000, 5.0
TOKENIZE_CONCURRENCY = 8


def _prompt(i: int) -> str:
    """Distinct for each ``i``, 200-250 bytes: under the 256 bytes up to which the BPE model caches a word."""
    rng = random.Random(i)
    words = [f"{i:06d}"]
    while len(" ".join(words)) < rng.randint(200, 244):
        words.append(rng.choice(("once", "upon", "a", "time", "little", "girl", "park", "ball", "sun", "dog")))
    return " ".join(words)


def _rss_anon_mb(pid: int) -> float:
    match = re.search(r"^RssAnon:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) / 1024


async def _tokenize_all(url: str, indices: range) -> dict[int, list[int]]:
    """Module flow, steps 2-3: ``/tokenize`` for each prompt, ``TOKENIZE_CONCURRENCY`` at a time; some ids back."""
    queue, sample = list(indices), {}
    async with aiohttp.ClientSession() as session:
        async def client() -> None:
            while queue:
                i = queue.pop()
                async with session.post(url + "/tokenize", json={"prompt": _prompt(i)}) as r:
                    assert r.status == 200, await r.text()
                    if i % 500 == 0:
                        sample[i] = (await r.json())["tokens"]

        await asyncio.gather(*(client() for _ in range(TOKENIZE_CONCURRENCY)))
    return sample


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_tokenizer_memory_stops_growing(tmp_path):
    h = RouterHarness(tmp_path)
    try:
        asyncio.run(_tokenize_all(h.url, range(FILL_PROMPTS)))
        filled = _rss_anon_mb(h.router.pid)
        sample = asyncio.run(_tokenize_all(h.url, range(FILL_PROMPTS, FILL_PROMPTS + MORE_PROMPTS)))
        grown = _rss_anon_mb(h.router.pid) - filled
        assert grown < GROWTH_LIMIT_MB, f"router RSS grew {grown:.1f} MB over {MORE_PROMPTS} more distinct prompts"
        assert sample and all(ids == TOK.encode(_prompt(i)) for i, ids in sample.items())
    finally:
        h.stop()
