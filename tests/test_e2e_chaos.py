"""Correctness under failure, end to end: many concurrent streams with client disconnects, and a worker
SIGKILLed in the middle, against real processes on loopback with the official (async) openai client.

* A prefill worker dies: every request that was not abandoned still finishes with all its tokens (decode workers
  recompute prompts whose transfer died).
* A decode worker dies: its requests fail with an error naming it; the others finish.

In both, finished texts equal the same requests served alone afterwards, nothing hangs, and every surviving
worker's KV pages are free at the end (read from the router's /metrics).
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass

import openai
import pytest

from cluster import Cluster
from conftest import shared_model_path
from test_e2e import PROMPTS, model_id

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


def check_alone(cluster: Cluster, model: str, done: list[tuple[Job, str]]) -> None:
    """Each text equals the same request served alone, after the storm."""
    alone = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=60)
    for job, text in done:
        ref = alone.completions.create(model=model, prompt=job.prompt, max_tokens=job.max_tokens, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
        assert text == ref, f"{job}: text under failure differs from the request served alone"


def start(tmp_path_factory, name: str, prefill: int, decode: int) -> Cluster:
    return Cluster(model=str(shared_model_path("stories260K")), prefill=prefill, decode=decode,
                   worker_args=["--page-size", "8", "--num-pages", "256", "--lease-s", "2", "--max-num-seqs", "16"],
                   router_args=["--heartbeat-timeout-s", "2"], log_dir=tmp_path_factory.mktemp(name)).start()


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
        used = c.wait_pages_free(ignore=frozenset({"prefill-0"}))
        assert set(used) == {"prefill-1", "decode-2", "decode-3"} and not any(used.values()), used
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
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
        used = c.wait_pages_free(ignore=frozenset({"decode-1"}))
        assert set(used) == {"prefill-0", "decode-2"} and not any(used.values()), used
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_requests_orphaned_by_a_router_restart_are_aborted_on_the_workers(tmp_path_factory):
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "512", "--max-num-seqs", "16", "--heartbeat-s", "0.3"],
                log_dir=tmp_path_factory.mktemp("chaos-router")).start()
    try:
        m = model_id(c)
        jobs = [Job(p, 480, None) for p in PROMPTS * 2]
        results = asyncio.run(storm(c, m, jobs, "router"))
        assert all(isinstance(res, openai.APIError) for res in results), results  # the router died under them
        c.restart_router()
        c.wait_workers(2, timeout_s=60)
        # The new router aborts outputs it has no stream for, so the workers stop generating for nobody: without
        # that, every request would run to its 480 tokens.
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        generated = sum(c.worker_gauge("decode_tokens_total").values())
        assert generated < len(jobs) * 480 * 0.9, generated
        assert complete_alone(c, m, "Once upon a time", 8).startswith(", there was a little")
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_a_router_gone_for_good_never_blocks_a_worker(tmp_path_factory):
    """With the router dead, a worker's output queue fills; it aborts what it cannot deliver and still stops on
    SIGTERM (a blocking send would hang it there for good)."""
    logs = tmp_path_factory.mktemp("chaos-router-gone")
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1, log_dir=logs,
                worker_args=["--page-size", "8", "--num-pages", "512", "--max-num-seqs", "16",
                             "--router-queue-limit", "20"]).start()
    try:
        results = asyncio.run(storm(c, model_id(c), [Job(p, 480, None) for p in PROMPTS * 2], "router"))
        assert all(isinstance(res, openai.APIError) for res in results), results
        log = logs / "decode-1.log"
        deadline = time.monotonic() + 120
        while "output could not reach the router; aborting" not in log.read_text():
            assert time.monotonic() < deadline, "the decode worker never gave up on the unreachable router"
            time.sleep(0.2)
        for name in ("decode-1", "prefill-0"):
            c.procs[name].send_signal(signal.SIGTERM)
            assert c.procs[name].wait(60) == 0, f"{name} did not stop cleanly"
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def complete_alone(c: Cluster, model: str, prompt: str, max_tokens: int) -> str:
    alone = openai.OpenAI(base_url=f"{c.url}/v1", api_key="unused", max_retries=0, timeout=60)
    return alone.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


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
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        assert complete_alone(c, m, "Once upon a time", 8).startswith(", there was a little")
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_tiny_kv_pools_under_load_still_give_every_request_its_solo_text(tmp_path_factory):
    """Pools far smaller than the load on both sides, and prompts prefilled (and streamed) in 16-token chunks:
    requests wait for pages, the decode worker preempts and recomputes."""
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "48", "--max-num-seqs", "16", "--chunk-size", "16",
                             "--max-num-batched-tokens", "64"],
                log_dir=tmp_path_factory.mktemp("chaos-pools")).start()
    try:
        m = model_id(c)
        rng = random.Random(5)
        prompts = [" ".join(rng.sample(PROMPTS * 3, rng.randint(2, 9))) for _ in range(24)]  # 8-70 tokens
        jobs = [Job(prompt, rng.randint(40, 120), None) for prompt in prompts]
        results = asyncio.run(storm(c, m, jobs, victim=None))
        assert all(isinstance(res, tuple) and res[1] == "length" for res in results), results
        check_alone(c, m, [(job, res[0]) for job, res in zip(jobs, results)])
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        assert c.worker_gauge("preemptions_total").get("decode-1", 0) >= 1  # the pools really ran out
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_ucx_transfer_end_to_end_with_a_killed_prefill_worker(tmp_path_factory):
    """The same disaggregated serving with KV over UCX (host memory on CPU): solo texts, recovery, no leaks."""
    from test_transfer import _ucx_available

    if _ucx_available() is not None:
        pytest.skip(f"ucx: {_ucx_available()}")
    c = Cluster(model=str(shared_model_path("stories260K")), prefill=2, decode=1,
                worker_args=["--page-size", "8", "--num-pages", "256", "--lease-s", "2", "--transfer", "ucx"],
                router_args=["--heartbeat-timeout-s", "2"], log_dir=tmp_path_factory.mktemp("chaos-ucx")).start()
    try:
        m = model_id(c)
        jobs = [Job(job.prompt, job.max_tokens, None) for job in make_jobs(random.Random(3))][:16]
        results = asyncio.run(storm(c, m, jobs, "prefill-0"))
        assert all(isinstance(res, tuple) and res[1] == "length" for res in results), results
        check_alone(c, m, [(job, res[0]) for job, res in zip(jobs, results)])
        used = c.wait_pages_free(ignore=frozenset({"prefill-0"}))
        assert set(used) == {"prefill-1", "decode-2"} and not any(used.values()), used
        assert sum(c.worker_gauge("transfer_bytes_total").values()) > 0
        assert "KV transfer over ucx, receiving at ucx://" in (c.log_dir / "decode-2.log").read_text()
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()


def test_garbage_on_every_socket_is_dropped_and_service_goes_on(tmp_path_factory):
    """Junk, wrong-shaped and out-of-place messages on the router's control socket and the workers' peer sockets."""
    import json
    import urllib.request

    import zmq

    from splitserve.core import messages as msgs

    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1, router_args=["--admin-token", "t"],
                worker_args=["--page-size", "8", "--num-pages", "128", "--lease-s", "2"],
                log_dir=tmp_path_factory.mktemp("chaos-garbage")).start()
    ctx = zmq.Context()
    try:
        req = urllib.request.Request(f"{c.url}/admin/workers", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(req) as r:
            peers = [w["peer_addr"] for w in json.load(r)["workers"]]
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
        assert complete_alone(c, m, "Once upon a time", 8).startswith(", there was a little")
        assert all(p.poll() is None for p in c.procs.values())
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        ctx.term()
        c.stop()


def test_roles_switched_back_and_forth_under_load_lose_nothing(tmp_path_factory):
    """While a storm runs, both workers are switched between prefill, decode and colocated through the admin API."""
    import json
    import urllib.request

    c = Cluster(model=str(shared_model_path("stories260K")), prefill=1, decode=1, router_args=["--admin-token", "t"],
                worker_args=["--page-size", "8", "--num-pages", "256", "--heartbeat-s", "0.3"],
                log_dir=tmp_path_factory.mktemp("chaos-roles")).start()

    def set_role(worker: str, role: str) -> None:
        req = urllib.request.Request(f"{c.url}/admin/workers/{worker}/role", data=json.dumps({"role": role}).encode(),
                                     headers={"Authorization": "Bearer t"}, method="POST")
        with urllib.request.urlopen(req) as r:
            assert r.status == 200

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
        used = c.wait_pages_free()
        assert used and not any(used.values()), used
        assert not c.tracebacks(), f"unhandled errors logged by {c.tracebacks()}"
    finally:
        c.stop()
