"""Correctness under failure, end to end: real router and worker processes on loopback, driven by the official
(async) openai client while things go wrong.

* A prefill worker is SIGKILLed mid-storm: every request not abandoned by its client still finishes (decode workers
  recompute prompts whose transfer died); the same over the UCX backend.
* A decode worker is SIGKILLed: its requests fail with an error naming it; the others finish.
* The router restarts (its orphaned requests are aborted on the workers) or is gone for good (workers never block).
* Clients time out at random moments; KV pools far smaller than the load; garbage on every socket; roles switched
  back and forth under load.

Finished texts equal the same requests served alone afterwards, nothing hangs, every surviving worker's KV pages
are free at the end (read from the router's /metrics), and no process logs a traceback.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass

import openai
import pytest

from cluster import Cluster, poll_until
from conftest import shared_model_path
from test_e2e import PROMPTS, complete, model_id, start_cluster
from test_e2e_ops import TOKEN, admin

N_REQUESTS = 36


@dataclass(frozen=True)
class Job:
    prompt: str
    max_tokens: int
    abandon_after: int | None
    """Close the stream after this many chunks (a client disconnect); ``None``: read to the end."""


def make_jobs(rng: random.Random) -> list[Job]:
    jobs = []
    for i in range(N_REQUESTS):
        prompt = f"{rng.choice(PROMPTS)} {rng.choice(PROMPTS).lower()}"
        jobs.append(Job(prompt, rng.randint(8, 96), rng.randint(1, 4) if i % 3 == 0 else None))
    return jobs


async def run_job(client: openai.AsyncOpenAI, model: str, job: Job, progress: asyncio.Event) -> tuple[str, str]:
    """Returns (text, finish_reason); ``finish_reason`` is ``"abandoned"`` for a client disconnect."""
    stream = await client.completions.create(model=model, prompt=job.prompt, max_tokens=job.max_tokens,
                                             temperature=0, stream=True, extra_body={"ignore_eos": True})
    text, finish, chunks = [], None, 0
    async for chunk in stream:
        chunks += 1
        progress.set()
        if job.abandon_after is not None and chunks >= job.abandon_after:
            await stream.close()
            return "".join(text), "abandoned"
        text.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    return "".join(text), finish


async def storm(cluster: Cluster, model: str, jobs: list[Job], victim: str | None) -> list:
    """Run ``jobs`` concurrently and SIGKILL ``victim`` (if any) once streams flow; results or exceptions, in job
    order."""
    client = openai.AsyncOpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=90)
    progress = asyncio.Event()
    tasks = [asyncio.create_task(run_job(client, model, job, progress)) for job in jobs]
    await asyncio.wait_for(progress.wait(), 60)  # streams are flowing: now the victim dies
    if victim is not None:
        await asyncio.to_thread(cluster.kill, victim)
    try:  # nothing hangs
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 240)
    finally:
        await client.close()


def alone_client(c: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)


def check_alone(cluster: Cluster, model: str, done: list[tuple[Job, str]]) -> None:
    """Each text equals the same request served alone, after the storm."""
    alone = alone_client(cluster)
    for job, text in done:
        ref = complete(alone, model, job.prompt, max_tokens=job.max_tokens, extra_body={"ignore_eos": True})
        assert text == ref.choices[0].text, f"{job}: text under failure differs from the request served alone"


def still_serves(c: Cluster, model: str) -> bool:
    """A fresh greedy request gives stories260K's reference start."""
    return complete(alone_client(c), model, "Once upon a time", max_tokens=8).choices[0].text.startswith(
        ", there was a little")


def assert_clean(c: Cluster, dead: frozenset[str] = frozenset()) -> dict[str, float]:
    """Every worker but ``dead`` ends with no KV page in use, and no process logged a traceback."""
    used = c.wait_pages_free(ignore=dead)
    assert used and not any(used.values()), used
    assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    return used


def start(tmp_path_factory, name: str, prefill: int, decode: int, **kw) -> Cluster:
    """stories260K with a 2 s lease and heartbeat timeout unless ``kw`` says otherwise."""
    kw.setdefault("worker_args", ["--page-size", "8", "--num-pages", "256", "--lease-s", "2", "--max-num-seqs", "16"])
    kw.setdefault("router_args", ["--heartbeat-timeout-s", "2"])
    return start_cluster(tmp_path_factory, name, model=str(shared_model_path("stories260K")), prefill=prefill,
                         decode=decode, **kw)


def test_disconnects_and_a_killed_prefill_worker_lose_no_request_and_leak_no_page(tmp_path_factory):
    c = start(tmp_path_factory, "chaos-prefill", prefill=2, decode=2)
    try:
        m = model_id(c)
        jobs = make_jobs(random.Random(7))
        results = asyncio.run(storm(c, m, jobs, "prefill-0"))
        kept = [(job, res) for job, res in zip(jobs, results) if job.abandon_after is None]
        assert len(kept) == N_REQUESTS - N_REQUESTS // 3
        assert all(isinstance(res, tuple) and res[1] == "length" for _, res in kept), [res for _, res in kept]
        check_alone(c, m, [(job, res[0]) for job, res in kept])
        # the kill really hit transfers in flight: decode workers recomputed their prompts
        assert sum(c.worker_gauge("transfers_failed_total").values()) >= 1
        assert set(assert_clean(c, dead=frozenset({"prefill-0"}))) == {"prefill-1", "decode-2", "decode-3"}
    finally:
        c.stop()


def test_a_killed_decode_worker_fails_only_its_requests_clearly(tmp_path_factory):
    c = start(tmp_path_factory, "chaos-decode", prefill=1, decode=2)
    try:
        m = model_id(c)
        jobs = [Job(job.prompt, job.max_tokens + 200, None) for job in make_jobs(random.Random(8))]  # long streams
        results = asyncio.run(storm(c, m, jobs, "decode-1"))
        failed = [res for res in results if isinstance(res, BaseException)]
        done = [(job, res[0]) for job, res in zip(jobs, results) if not isinstance(res, BaseException)]
        assert failed and done, results  # least-loaded routing spread the streams over both decode workers
        assert all(isinstance(e, openai.APIError) and "decode-1" in str(e) for e in failed), failed
        assert all(res[1] == "length" for res in results if not isinstance(res, BaseException))
        check_alone(c, m, done[:8])
        assert set(assert_clean(c, dead=frozenset({"decode-1"}))) == {"prefill-0", "decode-2"}
    finally:
        c.stop()


def test_requests_orphaned_by_a_router_restart_are_aborted_on_the_workers(tmp_path_factory):
    c = start(tmp_path_factory, "chaos-router", prefill=1, decode=1, router_args=[],
              worker_args=["--page-size", "8", "--num-pages", "512", "--max-num-seqs", "16", "--heartbeat-s", "0.3"])
    try:
        m = model_id(c)
        jobs = [Job(p, 480, None) for p in PROMPTS * 2]
        results = asyncio.run(storm(c, m, jobs, "router"))
        assert all(isinstance(res, openai.APIError) for res in results), results  # the router died under them
        c.restart_router()
        c.wait_workers(2, timeout_s=60)
        # The new router aborts outputs it has no stream for, so the workers stop generating for nobody: without
        # that, every request would run to its 480 tokens.
        assert_clean(c)
        generated = sum(c.worker_gauge("decode_tokens_total").values())
        assert generated < len(jobs) * 480 * 0.9, generated
        assert still_serves(c, m)
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_a_router_gone_for_good_never_blocks_a_worker(tmp_path_factory):
    """With the router dead, a worker's output queue fills; it aborts what it cannot deliver and still stops on
    SIGTERM (a blocking send would hang it there for good)."""
    c = start(tmp_path_factory, "chaos-router-gone", prefill=1, decode=1, router_args=[],
              worker_args=["--page-size", "8", "--num-pages", "512", "--max-num-seqs", "16",
                           "--router-queue-limit", "20"])
    try:
        results = asyncio.run(storm(c, model_id(c), [Job(p, 480, None) for p in PROMPTS * 2], "router"))
        assert all(isinstance(res, openai.APIError) for res in results), results
        log = c.log_dir / "decode-1.log"
        assert poll_until(lambda: "output could not reach the router; aborting" in log.read_text(), timeout_s=120), \
            "the decode worker never gave up on the unreachable router"
        for name in ("decode-1", "prefill-0"):
            c.procs[name].send_signal(signal.SIGTERM)
            assert c.procs[name].wait(60) == 0, f"{name} did not stop cleanly"
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_clients_timing_out_at_random_moments_leak_no_page(tmp_path_factory):
    """Clients give up 5-300 ms in: before routing, while pages are reserved, mid-transfer, mid-decode."""
    c = start(tmp_path_factory, "chaos-timeouts", prefill=1, decode=1)
    try:
        m = model_id(c)
        rng = random.Random(11)
        long_prompt = " ".join(PROMPTS * 8)

        async def one(client: openai.AsyncOpenAI, i: int) -> str:
            try:
                out = await client.with_options(timeout=rng.uniform(0.005, 0.3)).completions.create(
                    model=m, prompt=long_prompt if i % 2 else PROMPTS[i % len(PROMPTS)], max_tokens=64,
                    temperature=0, extra_body={"ignore_eos": True})
                return out.choices[0].finish_reason
            except openai.APITimeoutError:
                return "timeout"

        async def run() -> list[str]:
            client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0)
            try:
                return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(40))), 120)
            finally:
                await client.close()

        outcomes = asyncio.run(run())
        assert set(outcomes) <= {"length", "timeout"} and "timeout" in outcomes, outcomes
        assert still_serves(c, m)
        assert_clean(c)
    finally:
        c.stop()


def test_tiny_kv_pools_under_load_still_give_every_request_its_solo_text(tmp_path_factory):
    """Pools far smaller than the load on both sides, and prompts prefilled (and streamed) in 16-token chunks:
    requests wait for pages, the decode worker preempts and recomputes."""
    c = start(tmp_path_factory, "chaos-pools", prefill=1, decode=1, router_args=[],
              worker_args=["--page-size", "8", "--num-pages", "48", "--max-num-seqs", "16", "--chunk-size", "16",
                           "--max-num-batched-tokens", "64"])
    try:
        m = model_id(c)
        rng = random.Random(5)
        prompts = [" ".join(rng.sample(PROMPTS * 3, rng.randint(2, 9))) for _ in range(24)]  # 8-70 tokens
        jobs = [Job(prompt, rng.randint(40, 120), None) for prompt in prompts]
        results = asyncio.run(storm(c, m, jobs, victim=None))
        assert all(isinstance(res, tuple) and res[1] == "length" for res in results), results
        check_alone(c, m, [(job, res[0]) for job, res in zip(jobs, results)])
        assert_clean(c)
        assert c.worker_gauge("preemptions_total").get("decode-1", 0) >= 1  # the pools really ran out
    finally:
        c.stop()


def test_ucx_transfer_end_to_end_with_a_killed_prefill_worker(tmp_path_factory):
    """The same disaggregated serving with KV over UCX (host memory on CPU): solo texts, recovery, no leaks."""
    from test_transfer import _ucx_available

    if _ucx_available() is not None:
        pytest.skip(f"ucx: {_ucx_available()}")
    c = start(tmp_path_factory, "chaos-ucx", prefill=2, decode=1,
              worker_args=["--page-size", "8", "--num-pages", "256", "--lease-s", "2", "--transfer", "ucx"])
    try:
        m = model_id(c)
        jobs = [Job(job.prompt, job.max_tokens, None) for job in make_jobs(random.Random(3))][:16]
        results = asyncio.run(storm(c, m, jobs, "prefill-0"))
        assert all(isinstance(res, tuple) and res[1] == "length" for res in results), results
        check_alone(c, m, [(job, res[0]) for job, res in zip(jobs, results)])
        assert set(assert_clean(c, dead=frozenset({"prefill-0"}))) == {"prefill-1", "decode-2"}
        assert sum(c.worker_gauge("transfer_bytes_total").values()) > 0
        assert "KV transfer over ucx, receiving at ucx://" in (c.log_dir / "decode-2.log").read_text()
    finally:
        c.stop()


def test_garbage_on_every_socket_is_dropped_and_service_goes_on(tmp_path_factory):
    """Junk, wrong-shaped and out-of-place messages on the router's control socket and the workers' peer sockets."""
    import zmq

    from splitserve.core import messages as msgs

    c = start(tmp_path_factory, "chaos-garbage", prefill=1, decode=1, router_args=["--admin-token", TOKEN],
              worker_args=["--page-size", "8", "--num-pages", "128", "--lease-s", "2"])
    ctx = zmq.Context()
    try:
        status, listing = admin(c, "GET", "/admin/workers")
        assert status == 200
        peers = [w["peer_addr"] for w in listing["workers"]]
        bogus_dst = msgs.KVDescriptor("t-1", "tcp://127.0.0.1:9", "other-model", "float32", 1, 1, 1, 8, (0,), 4, 1.0)
        junk = [[b"\x00\xffnot msgpack"], [b"a", b"b", b"c"], [b""],
                [msgs.encode(msgs.Heartbeat(worker_id="ghost", role="both", running=0, waiting=0, queued_tokens=0,
                                            kv_pages_used=0, kv_pages_free=0, kv_pages_cached=0))],
                [msgs.encode(msgs.TokenOut(request_id="nobody", token_ids=(5,)))],
                [msgs.encode(msgs.PrefillReq(request_id="p-1", prompt_token_ids=(1, 2, 3, 4),
                                             params=msgs.SamplingParams(), dst=bogus_dst, reply_to="ghost"))],
                [msgs.encode(msgs.PrefillReq(request_id="p-2", prompt_token_ids=(10**9,),
                                             params=msgs.SamplingParams(), dst=bogus_dst, reply_to="ghost"))]]
        for addr in [f"tcp://127.0.0.1:{c.control_port}", *peers]:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            for frames in junk:
                sock.send_multipart(frames)
            time.sleep(0.5)
            sock.close()
        m = model_id(c)
        assert still_serves(c, m)
        assert all(p.poll() is None for p in c.procs.values())
        assert_clean(c)
    finally:
        ctx.term()
        c.stop()


def test_roles_switched_back_and_forth_under_load_lose_nothing(tmp_path_factory):
    """While a storm runs, both workers are switched between prefill, decode and colocated through the admin API."""
    c = start(tmp_path_factory, "chaos-roles", prefill=1, decode=1, router_args=["--admin-token", TOKEN],
              worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"])

    def set_role(worker: str, role: str) -> None:
        assert admin(c, "POST", f"/admin/workers/{worker}/role", {"role": role})[0] == 200

    async def switching(jobs: list[Job]) -> list[tuple[Job, object]]:
        client = openai.AsyncOpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=90)
        progress = asyncio.Event()
        tasks: list[tuple[Job, asyncio.Task]] = []

        def launch(batch: list[Job]) -> None:
            tasks.extend((job, asyncio.create_task(run_job(client, m, job, progress))) for job in batch)

        try:
            launch(jobs[:12])
            await asyncio.wait_for(progress.wait(), 60)
            for i, roles in enumerate((("both", "both"), ("decode", "prefill"), ("prefill", "decode"))):
                await asyncio.to_thread(set_role, "prefill-0", roles[0])
                await asyncio.to_thread(set_role, "decode-1", roles[1])
                launch(jobs[12 + 4 * i : 16 + 4 * i])
                await asyncio.sleep(0.3)
            results = await asyncio.wait_for(asyncio.gather(*(t for _, t in tasks), return_exceptions=True), 240)
            return [(job, res) for (job, _), res in zip(tasks, results)]
        finally:
            await client.close()

    try:
        m = model_id(c)
        jobs = [Job(job.prompt, job.max_tokens, None) for job in make_jobs(random.Random(13))][:24]
        done = asyncio.run(switching(jobs))
        assert len(done) == 24 and all(isinstance(res, tuple) and res[1] == "length" for _, res in done), done
        check_alone(c, m, [(job, res[0]) for job, res in done])
        assert_clean(c)
    finally:
        c.stop()
