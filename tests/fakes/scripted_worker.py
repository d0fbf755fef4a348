"""A scripted worker for router tests ONLY: speaks the real control protocol, generates no real tokens.

It connects a DEALER socket (identity = worker id) to the router, sends ``Register``, heartbeats,
and answers each ``GenerateReq`` with the ``--tokens`` script (cycled), one ``TokenOut`` per token,
until ``max_tokens`` (finish "length") or a stop token id (finish "stop"). Every message it receives
is appended as one JSON line to ``--log`` so tests can see what the router sent (``AbortReq``...).
``--die-after N`` kills the process abruptly after N generated tokens (a worker crash mid-stream).

Real end-to-end tests use real workers; this fake exists for router behaviour and faults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import zmq
import zmq.asyncio

from splitserve.core import messages as m


class ScriptedWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.script = [int(t) for t in args.tokens.split(",")]
        self.role = args.role
        self.role_epoch = 0
        self.draining = False
        self.tasks: dict[str, asyncio.Task] = {}
        self.generated = 0
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, args.worker_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(args.router)

    def log(self, record: dict) -> None:
        with open(self.args.log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    async def send(self, msg: m.Message) -> None:
        await self.sock.send(m.encode(msg))

    async def run(self) -> None:
        a = self.args
        await self.send(m.Register(worker_id=a.worker_id, role=a.role, model_id="scripted", peer_addr=f"peer-{a.worker_id}",
                                   transfer_addr=f"xfer-{a.worker_id}", num_pages=a.num_pages, page_size=4,
                                   max_model_len=a.max_model_len, vocab_size=a.vocab_size))
        self.log({"type": "started"})
        hb = asyncio.create_task(self.heartbeats())
        try:
            while True:
                self.handle(m.decode(await self.sock.recv()))
        finally:
            hb.cancel()

    async def heartbeats(self) -> None:
        a = self.args
        while True:
            busy = len(self.tasks)
            await self.send(m.Heartbeat(worker_id=a.worker_id, role=self.role, role_epoch=self.role_epoch, running=busy, waiting=0,
                                        queued_tokens=0, kv_pages_used=busy, kv_pages_free=a.num_pages - busy,
                                        kv_pages_cached=0, draining=self.draining, transfer_bytes_total=1024,
                                        transfer_seconds_total=0.5, cache_events=(("stored", (1, 2)),)))
            await asyncio.sleep(0.2)

    def handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.GenerateReq):
            self.log({"type": "GenerateReq", "request_id": msg.request_id, "prefill_worker": msg.prefill_worker,
                      "prompt_len": len(msg.prompt_token_ids), "max_tokens": msg.params.max_tokens,
                      "stop_token_ids": list(msg.params.stop_token_ids), "temperature": msg.params.temperature})
            self.tasks[msg.request_id] = asyncio.create_task(self.generate(msg))
        elif isinstance(msg, m.AbortReq):
            self.log({"type": "AbortReq", "request_id": msg.request_id, "reason": msg.reason})
            task = self.tasks.pop(msg.request_id, None)
            if task is not None:
                task.cancel()
        elif isinstance(msg, m.SetRole):
            self.log({"type": "SetRole", "role": msg.role})
            self.role, self.role_epoch = msg.role, msg.epoch
        elif isinstance(msg, m.Drain):
            self.log({"type": "Drain"})
            self.draining = True

    async def generate(self, req: m.GenerateReq) -> None:
        p = req.params
        n = len(req.prompt_token_ids)
        prompt_lps = None
        if p.prompt_logprobs is not None:
            prompt_lps = (None,) + tuple(self.logprob(t, p.prompt_logprobs, -1.0) for t in req.prompt_token_ids[1:])
        for i in range(p.max_tokens):
            await asyncio.sleep(self.args.token_delay)
            tid = self.script[i % len(self.script)]
            self.generated += 1
            if self.args.die_after and self.generated > self.args.die_after:
                os._exit(1)
            finish = "stop" if tid in p.stop_token_ids else ("length" if i == p.max_tokens - 1 else None)
            await self.send(m.TokenOut(request_id=req.request_id, token_ids=(tid,),
                                       logprobs=(self.logprob(tid, p.logprobs, -0.25),) if p.logprobs is not None else None,
                                       prompt_logprobs=prompt_lps if i == 0 else None, finish_reason=finish,
                                       num_prompt_tokens=n))
            if finish:
                break
        self.tasks.pop(req.request_id, None)

    @staticmethod
    def logprob(tid: int, top_n: int, value: float) -> m.TokenLogprob:
        return m.TokenLogprob(tid, value, tuple((tid + k, value - k) for k in range(top_n)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--router", required=True)
    p.add_argument("--worker-id", required=True)
    p.add_argument("--role", default="both", choices=["prefill", "decode", "both"])
    p.add_argument("--tokens", required=True, help="comma-separated token ids, cycled")
    p.add_argument("--log", required=True)
    p.add_argument("--token-delay", type=float, default=0.0)
    p.add_argument("--die-after", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--num-pages", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=0, help="reported in Register (0: unknown)")
    args = p.parse_args()
    try:
        asyncio.run(ScriptedWorker(args).run())
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
