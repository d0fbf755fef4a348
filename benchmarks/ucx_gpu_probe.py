"""Where does UCX stop moving GPU memory between two processes? A ladder of tag send/recv variants.

python -m splitserve.benchmarks.ucx_gpu_probe [--device cuda|cpu] [--mib 32] [--messages 8]
    [--progress blocking,polling] [--order recv-first,send-first] [--tls DEFAULT]

Every variant starts a receiver and a sender process, each with SplitServe's own ``_UcxWorker``, and moves
``--messages`` buffers of ``--mib`` MiB (message ``i`` filled with byte ``i + 1``), checking every byte:

* ``progress``: the UCX progress thread busy-polls or sleeps on the wakeup fd (cuda_ipc raises no wakeup event).
* ``order``: ``recv-first`` posts every receive before the sender starts (what a probe usually does);
  ``send-first`` posts them only after the sender has issued every send, as the KV backend does (its receiver
  posts a receive when the ZeroMQ chunk header arrives), so the data arrives as unexpected messages.

One line per variant, then a table. On CPU UCX uses tcp/shared memory; ``tests/test_transfer.py`` runs one variant.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import time
from dataclasses import dataclass

TAG_BASE = 0x5350_0000
WAIT_S = 20.0


@dataclass(frozen=True)
class Variant:
    progress: str
    """``blocking`` or ``polling``."""
    order: str
    """``recv-first`` or ``send-first``."""
    tls: str
    """``UCX_TLS`` for both processes; ``""``: UCX's default."""


@dataclass(frozen=True)
class ProbeResult:
    variant: Variant
    completed: int
    """Messages whose receive completed within ``WAIT_S``."""
    messages: int
    data_ok: bool
    seconds: float
    """``recv-first``: the sender's first send to its last completion; ``send-first``: the receiver's first
    posted receive to its last completion."""
    gpu_over_tcp: bool | None

    @property
    def ok(self) -> bool:
        return self.completed == self.messages and self.data_ok


def _device(kind: str, index: int):
    import torch

    if kind != "cuda":
        return torch.device("cpu")
    dev = torch.device("cuda", min(index, torch.cuda.device_count() - 1))
    torch.cuda.set_device(dev)
    return dev


def _worker(variant: Variant, kind: str, index: int):
    if variant.tls:
        os.environ["UCX_TLS"] = variant.tls
    from splitserve.transfer.ucx_backend import _UcxWorker

    dev = _device(kind, index)
    return dev, _UcxWorker(dev, variant.progress)


def _wait(requests: list, deadline: float) -> int:
    while time.perf_counter() < deadline and not all(r.completed for r in requests):
        time.sleep(0.0005)
    return sum(1 for r in requests if r.completed)


def _receiver(variant: Variant, kind: str, nbytes: int, messages: int, ctl, out) -> None:
    import torch

    dev, w = _worker(variant, kind, 1)
    eps: list = []
    listener = w.api.UCXListener.create(worker=w.worker, port=0, cb_func=lambda cr: eps.append(
        listener.create_endpoint_from_conn_request(cr, endpoint_error_handling=True)))
    bufs = [torch.zeros(nbytes, dtype=torch.uint8, device=dev) for _ in range(messages)]

    def post() -> list:
        return [w.worker.tag_recv(w.array(b), w.tag(TAG_BASE + i)) for i, b in enumerate(bufs)]

    reqs = post() if variant.order == "recv-first" else []
    out.put(("port", listener.port))
    ctl.get(timeout=120)  # "go": the sender has issued every send
    if variant.order == "send-first":
        time.sleep(0.2)  # let the data arrive before any receive exists
        reqs = post()
    t0 = time.perf_counter()
    done = _wait(reqs, t0 + WAIT_S)
    secs = time.perf_counter() - t0
    ok = done == messages and all(bool((b == i + 1).all()) for i, b in enumerate(bufs))
    for r in reqs:
        if r.completed:
            r.check_error()
    out.put(("result", done, ok, secs, w.gpu_over_tcp))
    ctl.get(timeout=120)  # "bye": the sender is finished, endpoints may go
    w.stop()


def _sender(variant: Variant, kind: str, nbytes: int, messages: int, port: int, ctl, out) -> None:
    import torch

    dev, w = _worker(variant, kind, 0)
    ep = w.api.UCXEndpoint.create(w.worker, "127.0.0.1", port, endpoint_error_handling=True)
    bufs = [torch.full((nbytes,), i + 1, dtype=torch.uint8, device=dev) for i in range(messages)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    reqs = [ep.tag_send(w.array(b), w.tag(TAG_BASE + i)) for i, b in enumerate(bufs)]
    out.put(("sent",))
    done = _wait(reqs, t0 + WAIT_S + 5)
    out.put(("done", done, time.perf_counter() - t0))
    ctl.get(timeout=120)
    w.stop()


def probe(variant: Variant, kind: str = "cuda", nbytes: int = 32 << 20, messages: int = 8) -> ProbeResult:
    """Run one variant in two fresh processes; never raises for a UCX failure (it shows in the result)."""
    ctx = mp.get_context("spawn")
    to_recv, to_send, out_r, out_s = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    r = ctx.Process(target=_receiver, args=(variant, kind, nbytes, messages, to_recv, out_r), daemon=True)
    r.start()
    procs = [r]
    try:
        port = out_r.get(timeout=120)[1]
        s = ctx.Process(target=_sender, args=(variant, kind, nbytes, messages, port, to_send, out_s), daemon=True)
        s.start()
        procs.append(s)
        out_s.get(timeout=120)  # ("sent",)
        to_recv.put("go")
        _, done, ok, recv_secs, over_tcp = out_r.get(timeout=WAIT_S + 60)
        _, _, send_secs = out_s.get(timeout=WAIT_S + 60)
        # recv-first: the sender's clock covers exactly the transfer; send-first: the receiver's (data offered)
        return ProbeResult(variant, done, messages, ok, send_secs if variant.order == "recv-first" else recv_secs,
                           over_tcp)
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure as a row
        print(f"  {variant}: no answer from a probe process: {exc!r}", flush=True)
        return ProbeResult(variant, 0, messages, False, float("nan"), None)
    finally:
        to_recv.put("bye")
        to_send.put("bye")
        for p in procs:
            p.join(15)
            if p.is_alive():
                p.kill()


def table(results: list[ProbeResult], nbytes: int) -> str:
    rows = ["| progress | order | UCX_TLS | completed | bytes ok | seconds | GB/s | gpu over tcp |",
            "|---|---|---|---:|---|---:|---:|---|"]
    for res in results:
        v = res.variant
        gbps = f"{res.messages * nbytes / res.seconds / 1e9:.1f}" if res.ok and res.seconds > 0 else ""
        rows.append(f"| {v.progress} | {v.order} | {v.tls or 'default'} | {res.completed}/{res.messages} | "
                    f"{res.data_ok} | {res.seconds:.3f} | {gbps} | {res.gpu_over_tcp} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--messages", type=int, default=8)
    ap.add_argument("--progress", default="blocking,polling")
    ap.add_argument("--order", default="recv-first,send-first")
    ap.add_argument("--tls", default="", help="comma-free UCX_TLS values separated by ';' ('' = UCX default)")
    args = ap.parse_args(argv)
    nbytes = args.mib << 20
    results = []
    for progress, order, tls in itertools.product(args.progress.split(","), args.order.split(","),
                                                  args.tls.split(";")):
        res = probe(Variant(progress, order, tls), args.device, nbytes, args.messages)
        print(f"{res.variant}: ok={res.ok} completed={res.completed}/{res.messages} in {res.seconds:.3f}s",
              flush=True)
        results.append(res)
    print(table(results, nbytes))


if __name__ == "__main__":
    main()
