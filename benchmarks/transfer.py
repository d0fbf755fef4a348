"""``splitserve bench transfer``: move one request's KV pages between two processes and compare to a raw baseline.

This process is the receiver (decode side); a spawned child is the sender (prefill side, see
:mod:`splitserve.transfer.loopback`). Every byte is verified: the child reports a sha256 of its source tokens,
this process hashes what landed in its pages (token-major, so differing page sizes compare equal).

A round is timed from the sender's first ``begin`` to the moment the receiver reports the last transfer complete
(both processes read this host's CLOCK_MONOTONIC): when the decode side may use the pages. The time until the
sender has the receiver's acknowledgement is reported too (``sender_gbps``).

Baseline, measured in the same run over the same transport: one contiguous buffer of the same size sent by the
same child (ZeroMQ: one zero-copy message, acked; UCX: one tag send). The one-sided backends (``cuda_ipc``,
``shm``; ``auto`` picks one) write straight into this process's pages, so their baseline is one in-process copy of
a contiguous buffer of the same size (``cuda:0 -> cuda:1`` peer copy on two GPUs, a host memcpy on CPU). On GPU,
with two GPUs, the torch peer copy is reported for every backend. With ``--device cuda`` the sender uses
``cuda:0`` and the receiver ``cuda:1`` when there are two GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import threading
import time
from types import MappingProxyType
from typing import Any, Mapping

MODEL_SHAPES: Mapping[str, dict[str, int]] = MappingProxyType({
    "llama3-8b": {"num_layers": 32, "num_kv_heads": 8, "head_dim": 128},
    "llama3-70b": {"num_layers": 80, "num_kv_heads": 8, "head_dim": 128},
    "tiny": {"num_layers": 4, "num_kv_heads": 2, "head_dim": 16},
})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("auto", "zmq", "ucx", "cuda_ipc", "shm", "nixl"), default="auto",
                        help="auto: cuda_ipc on GPUs, shm on CPUs (one-sided writes into the receiver's pages); "
                             "nixl: one-sided over NIXL/UCX")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: sender on cuda:0, receiver on cuda:1 when there are two GPUs")
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="llama3-8b", help="layers, KV heads and head size of the pages moved")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt tokens of the request (default 2048)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--src-page-size", type=int, default=16, help="tokens per page in the sender's pool")
    parser.add_argument("--dst-page-size", type=int, default=16, help="tokens per page in the receiver's pool")
    parser.add_argument("--chunk-tokens", type=int, default=0, help="tokens per send_layer call (0: whole prompt)")
    parser.add_argument("--page-order", choices=("scattered", "contiguous"), default="scattered",
                        help="scattered: every request's pages in reverse order on both sides (no two adjacent); "
                             "contiguous: ascending runs, as a fresh pool or reserve() hands them out")
    parser.add_argument("--requests", type=int, default=8,
                        help="requests transferred at once (default 8: the KV path's bandwidth with transfers in "
                             "flight together, as under load; 1: one request's latency, fixed host costs included)")
    parser.add_argument("--layers-per-call", type=int, default=0,
                        help="layers per send call (default 0: all of them, one send_layers range per request, which "
                             "the one-sided backends copy in one launch; 1: layer by layer as a prefill step sends "
                             "them, every request of the round in one send_step_layer call, whose per-layer launches "
                             "serving hides under the layers' compute)")
    parser.add_argument("--ipc", action="store_true", help="ZeroMQ over ipc:// instead of tcp://")
    parser.add_argument("--host", default="127.0.0.1", help="host the receiver binds")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each side (best is reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _resolve(args: argparse.Namespace) -> tuple[str, str, str]:
    """(dtype, sender device, receiver device)."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if args.device == "cuda" else "float32")
    if args.device == "cpu":
        return dtype, "cpu", "cpu"
    return dtype, "cuda:0", "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"


class _RawReceiver:
    """Background receiver of the raw baseline: ZeroMQ ROUTER that acks, or a UCX listener + tag receives."""

    def __init__(self, args: argparse.Namespace, nbytes: int, device: str) -> None:
        self.args, self.nbytes, self.device = args, nbytes, device
        self.error: BaseException | None = None
        self.address = self._zmq_setup() if args.backend == "zmq" else self._ucx_setup()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _zmq_setup(self) -> str:
        import zmq

        from splitserve.core.config import TransferConfig
        from splitserve.transfer.zmq_backend import bind_endpoint

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        return bind_endpoint(self.sock, TransferConfig(host=self.args.host, use_ipc=self.args.ipc), "raw")

    def _ucx_setup(self) -> str:
        import torch

        from splitserve.transfer.ucx_backend import _UcxWorker

        self.ucx = _UcxWorker(torch.device(self.device))
        self.eps: list[Any] = []
        self.listener = self.ucx.api.UCXListener.create(
            worker=self.ucx.worker, port=0, cb_func=lambda req: self.eps.append(
                self.listener.create_endpoint_from_conn_request(req, endpoint_error_handling=True)
            )
        )
        self.dst = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return f"ucx://{self.args.host}:{self.listener.port}"

    def _run(self) -> None:
        try:
            for i in range(self.args.repeat + 1):
                if self.args.backend == "zmq":
                    frames = self.sock.recv_multipart(copy=False)
                    self.sock.send_multipart([frames[0], b"ok"])
                else:
                    req = self.ucx.worker.tag_recv(self.ucx.array(self.dst), self.ucx.tag(i))
                    while not req.completed:
                        time.sleep(0.0001)
                    req.check_error()
        except BaseException as exc:  # noqa: BLE001 - re-raised by close() on the main thread
            self.error = exc

    def close(self) -> None:
        self.thread.join(60)
        if self.args.backend == "zmq":
            self.sock.close(linger=0)
            self.ctx.term()
        else:
            self.ucx.close_endpoints(self.eps)
            self.ucx.stop()
        if self.error is not None:
            raise RuntimeError(f"raw baseline receiver failed: {self.error}") from self.error


def _peer_copy_gbps(nbytes: int, repeat: int) -> float | None:
    """In-process torch copy cuda:0 -> cuda:1 (None without two GPUs)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize("cuda:0")
        torch.cuda.synchronize("cuda:1")
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _kernel_gbps(args: argparse.Namespace, shape: dict[str, int], dtype: str) -> dict[str, float] | None:
    """The one-sided path's copy kernel alone, in this process, cuda:0 pages -> cuda:1 pages (peer access), for
    several tokens-per-program settings: what the kernel reaches without any messaging. ``None`` without 2 GPUs."""
    import torch

    from splitserve.kernels.cache import copy_slots_layers
    from splitserve.transfer.base import token_slots

    if args.device != "cuda" or torch.cuda.device_count() < 2:
        return None
    n_pages = -(-args.tokens // args.src_page_size) + 2
    dims = (shape["num_layers"], 2, n_pages, args.src_page_size, shape["num_kv_heads"], shape["head_dim"])
    src = torch.randn(dims, device="cuda:0").to(getattr(torch, dtype))
    dst = torch.empty(dims, dtype=src.dtype, device="cuda:1")
    pages = list(range(n_pages - 1, 1, -1))  # scattered (reversed) pages, as the transfer above uses
    slots = torch.from_numpy(token_slots(pages, args.src_page_size, 0, args.tokens)).to("cuda:0")
    nbytes = src[:, :, 0, 0].numel() * src.element_size() * args.tokens
    out = {}
    for t in (1, 2, 4, 8, 16):
        run = lambda: copy_slots_layers(src, dst, 0, shape["num_layers"], slots, slots, tokens_per_program=t)  # noqa: E731
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(max(3, args.repeat)):
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[str(t)] = nbytes / min(times) / 1e9
    if not torch.equal(dst.flatten(2, 3)[:, :, slots.to("cuda:1")].cpu(), src.flatten(2, 3)[:, :, slots].cpu()):
        raise RuntimeError("copy kernel check failed: destination rows differ from the source rows")
    return out


def _local_copy_gbps(nbytes: int, device: str, repeat: int) -> float:
    """One in-process copy of a contiguous buffer (the one-sided backends' ceiling when there is no peer GPU)."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        if dst.is_cuda:
            torch.cuda.synchronize(dst.device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _transport(args: argparse.Namespace) -> str:
    if args.backend == "zmq":
        return "ipc" if args.ipc else "tcp"
    return args.backend


def main(args: argparse.Namespace) -> int:
    import logging

    logging.getLogger("splitserve.transfer").setLevel(logging.INFO)
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0 if result["verified"] else 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    import multiprocessing as mp

    from splitserve.transfer.loopback import RawSpec, SenderProcess

    from splitserve.transfer.registry import DIRECT_BACKENDS, resolve

    dtype, src_dev, dst_dev = _resolve(args)
    args.backend = resolve(args.backend, args.device)
    shape = MODEL_SHAPES[args.model_shape]
    if args.layers_per_call <= 0:
        args.layers_per_call = shape["num_layers"]
    child = SenderProcess(mp.get_context("spawn"))
    try:
        kv = _measure_kv(args, child, dtype, shape, src_dev, dst_dev)
        nbytes = kv["bytes"]
        peer = _peer_copy_gbps(nbytes, args.repeat) if args.device == "cuda" else None
        kernel = _kernel_gbps(args, shape, dtype) if args.backend == "cuda_ipc" else None
        if args.backend in DIRECT_BACKENDS:
            baseline = peer if peer is not None else _local_copy_gbps(nbytes, src_dev, args.repeat)
        else:
            raw = _RawReceiver(args, nbytes, dst_dev)
            seconds = child.raw(RawSpec(args.backend, raw.address, nbytes, src_dev, args.repeat))
            raw.close()
            baseline = nbytes / min(seconds) / 1e9
    finally:
        child.stop()
    return {
        **kv,
        "baseline_gbps": baseline,  # full precision: round when printing (tiny CPU transfers are well below 1 GB/s)
        "ratio": kv["gbps"] / baseline,
        "peer_copy_gbps": peer,
        "ratio_to_peer_copy": None if peer is None else kv["gbps"] / peer,
        "copy_kernel_gbps_by_tokens_per_program": kernel,
        "backend": args.backend,
        "transport": _transport(args),
        "descriptors": kv["descriptors"],
        "device": args.device,
        "src_device": src_dev,
        "dst_device": dst_dev,
        "model_shape": args.model_shape,
        "dtype": dtype,
        "tokens": args.tokens,
        "page_sizes": [args.src_page_size, args.dst_page_size],
        "layers_per_call": args.layers_per_call,
        "requests": args.requests,
        "page_order": args.page_order,
        "card": _card(args.device),
        "date": datetime.date.today().isoformat(),
    }


def _measure_kv(args: argparse.Namespace, child: Any, dtype: str, shape: dict[str, int], src_dev: str, dst_dev: str) -> dict[str, Any]:
    """Best of ``args.repeat`` timed rounds of ``args.requests`` transfers (each round after a warm-up transfer);
    verifies every byte of every request."""
    import torch

    from splitserve.core.config import TransferConfig
    from splitserve.transfer.base import KVLayout, TransferComplete
    from splitserve.transfer.registry import make_copy_engine, make_receiver, resolve
    from splitserve.transfer.loopback import token_checksum

    dst_layout = KVLayout(args.model_shape, dtype, **shape, page_size=args.dst_page_size)
    cfg = TransferConfig(backend=args.backend, host=args.host, use_ipc=args.ipc)
    per = -(-args.tokens // args.dst_page_size)
    dst_pages = (args.requests + 1) * per + 2
    pool_shape = (shape["num_layers"], 2, dst_pages, args.dst_page_size, shape["num_kv_heads"], shape["head_dim"])
    copy = make_copy_engine(resolve(args.backend, torch.device(dst_dev).type), torch.device(dst_dev))
    kv = (copy.allocate(pool_shape, dst_layout.torch_dtype, torch.device(dst_dev)) if copy is not None
          else torch.zeros(pool_shape, dtype=dst_layout.torch_dtype, device=dst_dev))
    rx = make_receiver(cfg, kv, dst_layout, copy)
    best, best_sender, verified = float("inf"), float("inf"), True
    try:
        for i in range(args.repeat):
            order = list(range(dst_pages - 1, per, -1))  # reversed: every request's pages scattered
            if args.page_order == "contiguous":
                order.reverse()
            descs = [_reserve(rx, dst_layout, f"warm{i}", 16, tuple(range(-(-16 // args.dst_page_size))))] + [
                _reserve(rx, dst_layout, f"kv{i}.{j}", args.tokens, tuple(order[j * per:(j + 1) * per]))
                for j in range(args.requests)
            ]
            child.start(_sender_spec(args, dtype, shape, src_dev, descs))
            events, arrived = _pump(rx, {d.transfer_id for d in descs}, timeout_s=300)
            report = child.report()
            ok = all(isinstance(events.get(d.transfer_id), TransferComplete) for d in descs)
            landed = tuple(token_checksum(kv, d.page_ids, args.tokens) for d in descs[1:])
            verified = verified and ok and report.checksums == landed
            if ok:  # both clocks are this host's CLOCK_MONOTONIC
                best = min(best, max(arrived[d.transfer_id] for d in descs[1:]) - report.started_at)
            best_sender = min(best_sender, report.seconds)
        gpu_over_tcp = bool(getattr(rx, "gpu_over_tcp", False))
    finally:
        rx.close()
    nbytes = dst_layout.token_bytes() * args.tokens * shape["num_layers"] * args.requests
    return {"bytes": nbytes, "seconds": best, "gbps": nbytes / best / 1e9, "verified": verified,
            "sender_seconds": best_sender, "sender_gbps": nbytes / best_sender / 1e9,
            "ucx_gpu_over_tcp": gpu_over_tcp, "descriptors": _descriptor_count(args, shape, descs[1:])}


def _descriptor_count(args: argparse.Namespace, shape: dict[str, int], descs: list[Any]) -> int:
    """What one round moves in: copies (cuda_ipc/shm: kernel launches), NIXL descriptors (one per run of rows
    contiguous in both pools, per layer plane), or messages (zmq/ucx: one per layer and chunk)."""
    per_request = -(-args.tokens // (args.chunk_tokens or args.tokens))
    chunks = per_request * args.requests
    if args.backend == "nixl":
        from splitserve.transfer.base import token_slots
        from splitserve.transfer.nixl import coalesce_runs

        src = token_slots(_src_pages(args, args.tokens), args.src_page_size, 0, args.tokens)
        runs = sum(len(coalesce_runs(src, token_slots(d.page_ids, args.dst_page_size, 0, args.tokens))) for d in descs)
        return runs * 2 * shape["num_layers"]
    if args.backend in ("cuda_ipc", "shm"):  # layer by layer, one launch covers every request of the step
        return shape["num_layers"] * per_request if args.layers_per_call == 1 else -(-shape["num_layers"] // args.layers_per_call) * chunks
    return shape["num_layers"] * chunks


def _src_pages(args: argparse.Namespace, num_tokens: int) -> tuple[int, ...]:
    """The sender's pages of a request of ``num_tokens``: reversed from the top of its pool (scattered), or ascending
    from page 1 (``--page-order contiguous``)."""
    n = -(-num_tokens // args.src_page_size)
    if args.page_order == "contiguous":
        return tuple(range(1, 1 + n))
    top = -(-args.tokens // args.src_page_size) + 1
    return tuple(range(top, top - n, -1))


def _sender_spec(args: argparse.Namespace, dtype: str, shape: dict[str, int], device: str, descs: list[Any]) -> Any:
    """Spec for the child: ``descs[0]`` is the warm-up, ``descs[1:]`` the timed requests (all read the same
    source pages, reversed)."""
    from splitserve.transfer.loopback import SenderJob, SenderSpec

    src_pages = -(-args.tokens // args.src_page_size) + 2
    order = tuple(range(shape["num_layers"]))

    def job(desc: Any) -> SenderJob:
        chunk = args.chunk_tokens or desc.num_tokens
        return SenderJob(desc, f"req-{desc.transfer_id}", _src_pages(args, desc.num_tokens), order, chunk)

    return SenderSpec(
        transfer_cfg={"backend": args.backend, "host": args.host, "use_ipc": args.ipc},
        layout={"model_id": args.model_shape, "dtype": dtype, **shape, "page_size": args.src_page_size},
        num_pages=src_pages, seed=1234, jobs=tuple(job(d) for d in descs[1:]), device=device, wait_s=300.0,
        warmup=job(descs[0]), checksums=True, layers_per_call=args.layers_per_call, step_layers=True,
    )


def _reserve(rx: Any, layout: Any, tid: str, num_tokens: int, pages: tuple[int, ...]) -> Any:
    """Expect a transfer of ``num_tokens`` into ``pages``."""
    from splitserve.core.messages import KVDescriptor

    desc = KVDescriptor(tid, rx.address, layout.model_id, layout.dtype, layout.num_layers, layout.num_kv_heads,
                        layout.head_dim, layout.page_size, pages, num_tokens, 120.0, pool=rx.pool_export)
    rx.expect(desc)
    return desc


def _pump(rx: Any, ids: set[str], timeout_s: float) -> tuple[dict[str, Any], dict[str, float]]:
    """Receive until every transfer in ``ids`` ended: (final event, ``time.perf_counter()`` it was seen) by id."""
    from splitserve.transfer.base import TransferComplete, TransferFailed

    final: dict[str, Any] = {}
    arrived: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while ids - final.keys() and time.monotonic() < deadline:
        for ev in rx.poll(10):
            if isinstance(ev, (TransferComplete, TransferFailed)):
                final[ev.transfer_id] = ev
                arrived[ev.transfer_id] = time.perf_counter()
    return final, arrived


def _card(device: str) -> str:
    import os

    import torch

    if device == "cuda":
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _print_table(r: dict[str, Any]) -> None:
    print(f"# bench transfer  {r['date']}  card: {r['card']}")
    print(f"backend={r['backend']} transport={r['transport']} shape={r['model_shape']} dtype={r['dtype']} "
          f"tokens={r['tokens']} x {r['requests']} requests, pages {r['page_sizes'][0]}->{r['page_sizes'][1]} "
          f"({r['bytes'] / 2**20:.1f} MiB), {r['layers_per_call']} layers per call")
    print(f"{'path':<28}{'GB/s':>10}")
    print(f"{'KV pages (this backend)':<28}{r['gbps']:>10.3f}   (until the receiver completed; "
          f"{r['sender_gbps']:.3f} until the sender's ack)")
    base_name = "contiguous copy (in-proc)" if r["transport"] in ("cuda_ipc", "shm") else "raw contiguous buffer"
    print(f"{base_name:<28}{r['baseline_gbps']:>10.3f}")
    if r["peer_copy_gbps"] is not None:
        print(f"{'torch peer copy (in-proc)':<28}{r['peer_copy_gbps']:>10.3f}")
    for t, gbps in (r.get("copy_kernel_gbps_by_tokens_per_program") or {}).items():
        print(f"{f'copy kernel alone, {t} tok/prog':<28}{gbps:>10.3f}")
    print(f"ratio to raw baseline: {r['ratio']:.3f}   verified: {r['verified']}")
