"""Requests fail alone (issue 12): poison requests sent past the router's checks to real worker processes.

The test plays the router on the control socket (so nothing at the API edge stops the poison), starts a real
prefill and a real decode worker, and sends 20 normal requests mixed with poison ones straight to the decode
worker as ``GenerateReq``. Each poison request must end on its own (an error, or valid tokens when the sampler can
honour it), never recomputed by the decode worker; both workers keep serving; every page comes back.
"""

from __future__ import annotations

import subprocess
import sys
import time

import zmq

from cluster import free_port
from conftest import shared_model_path
from splitserve.core.messages import (
    GenerateReq, Heartbeat, Register, SamplingParams, TokenOut, TokenOuts, decode, encode,
)

NORMAL = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
VOCAB = 512  # stories260K
POISON = {
    "nan-temperature": SamplingParams(max_tokens=8, temperature=float("nan")),  # refused when added: never computed
    "every-token-banned": SamplingParams(max_tokens=8, min_tokens=4, stop_token_ids=tuple(range(VOCAB))),
    "tiny-repetition-penalty": SamplingParams(max_tokens=8, repetition_penalty=1e-300, temperature=1.0, seed=3),
    "huge-temperature": SamplingParams(max_tokens=8, min_tokens=1, temperature=1e39, seed=4),
    "stop-id-outside-vocab": SamplingParams(max_tokens=8, min_tokens=1, stop_token_ids=(100000,), temperature=0.0),
}


class FakeRouter:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.port = free_port()
        self.sock.bind(f"tcp://127.0.0.1:{self.port}")
        self.workers: dict[str, Register] = {}
        self.identities: dict[str, bytes] = {}
        """worker id -> the ZeroMQ identity it connected with (unguessable, one per process start)."""
        self.beats: dict[str, Heartbeat] = {}
        self.outputs: dict[str, list[TokenOut]] = {}

    def pump(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            ident, payload = self.sock.recv_multipart()
            msg = decode(payload)
            if isinstance(msg, Register):
                self.workers[msg.worker_id] = msg
                self.identities[msg.worker_id] = ident
            elif isinstance(msg, Heartbeat):
                self.beats[msg.worker_id] = msg
            elif isinstance(msg, (TokenOut, TokenOuts)):
                for out in msg.outs if isinstance(msg, TokenOuts) else (msg,):
                    self.outputs.setdefault(out.request_id, []).append(out)

    def send(self, worker_id: str, msg: GenerateReq) -> None:
        self.sock.send_multipart([self.identities[worker_id], encode(msg)])

    def finished(self, rid: str) -> TokenOut | None:
        return next((o for o in self.outputs.get(rid, []) if o.finish_reason is not None), None)

    def wait(self, pred, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.pump(0.1)


def _worker(role: str, router_port: int, log) -> subprocess.Popen:
    model = str(shared_model_path("stories260K"))
    return subprocess.Popen(
        [sys.executable, "-m", "splitserve.cli", role, "--worker-id", f"{role}-0", "--model", model,
         "--router-addr", f"tcp://127.0.0.1:{router_port}", "--page-size", "8", "--num-pages", "256",
         "--heartbeat-s", "0.2", "--lease-s", "5"],
        stdout=log, stderr=subprocess.STDOUT)


def test_poison_requests_fail_alone_on_real_workers(tmp_path):
    router = FakeRouter()
    logs = {r: open(tmp_path / f"{r}.log", "wb") for r in ("prefill", "decode")}
    procs = {r: _worker(r, router.port, logs[r]) for r in ("prefill", "decode")}
    try:
        router.wait(lambda: len(router.workers) == 2, 120, "both workers to register")
        prefill_addr = router.workers["prefill-0"].peer_addr
        sent: dict[str, SamplingParams] = {}
        for i in range(20):
            sent[f"ok-{i}"] = NORMAL
            if i % 4 == 0 and POISON:
                name = list(POISON)[i // 4]
                sent[f"bad-{name}"] = POISON[name]
        for rid, params in sent.items():
            prompt = tuple(1 + (j * 7 + len(rid)) % (VOCAB - 1) for j in range(20 + len(rid)))
            router.send("decode-0", GenerateReq(request_id=rid, prompt_token_ids=prompt, params=params,
                                                prefill_worker="prefill-0", prefill_addr=prefill_addr))
        router.wait(lambda: all(router.finished(r) for r in sent), 120, "every request to finish")
        for rid in sent:
            last = router.finished(rid)
            tokens = [t for o in router.outputs[rid] for t in o.token_ids]
            if rid.startswith("ok-"):
                assert last.finish_reason == "length" and len(tokens) == 12, (rid, last)
            else:  # failed with a reason, or served with valid ids
                assert (last.finish_reason == "error" and last.error) or all(0 <= t < VOCAB for t in tokens), (rid, last)
        assert router.finished("bad-nan-temperature").finish_reason == "error"
        assert router.finished("bad-every-token-banned").finish_reason == "error"
        assert all(p.poll() is None for p in procs.values())  # both workers alive
        # the failures were the requests' own: the decode worker recomputed none of them
        router.wait(lambda: router.beats.get("decode-0") and router.beats["decode-0"].kv_pages_used == 0
                    and router.beats.get("prefill-0") and router.beats["prefill-0"].kv_pages_used == 0, 30, "pages free")
        assert router.beats["decode-0"].transfers_failed_total == 0
        decode_log = (tmp_path / "decode.log").read_text()
        assert "recomputing" not in decode_log and "Traceback" not in decode_log
        # and they keep serving
        router.send("decode-0", GenerateReq(request_id="after", prompt_token_ids=(1, 5, 9, 13), params=NORMAL,
                                            prefill_worker="prefill-0", prefill_addr=prefill_addr))
        router.wait(lambda: router.finished("after"), 60, "a request after the poison")
        assert router.finished("after").finish_reason == "length"
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        router.sock.close(linger=0)
        router.ctx.term()
