"""Does ucxx move GPU memory between two processes here? A minimal tag send/recv through SplitServe's UCX worker.

python -m splitserve.benchmarks.ucx_gpu_probe [--mib 64] [--device cuda|cpu]   (prints one line per variant)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

TAG = 12345


def _recv(q, device: str, nbytes: int, env: dict) -> None:
    os.environ.update(env)
    import torch

    from splitserve.transfer.ucx_backend import _UcxWorker

    dev = torch.device(device, 1 if device == "cuda" and torch.cuda.device_count() > 1 else 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    w = _UcxWorker(dev)
    eps = []
    listener = w.api.UCXListener.create(worker=w.worker, port=0, cb_func=lambda cr: eps.append(
        listener.create_endpoint_from_conn_request(cr, endpoint_error_handling=True)))
    q.put(listener.port)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
    req = w.worker.tag_recv(w.array(buf), w.tag(TAG))
    t0 = time.perf_counter()
    while not req.completed and time.perf_counter() - t0 < 20:
        time.sleep(0.001)
    ok = bool(req.completed)
    if ok:
        req.check_error()
    q.put((ok, time.perf_counter() - t0, int(buf[:16].sum().item()), w.gpu_over_tcp))
    time.sleep(0.5)
    w.stop()


def _send(port: int, device: str, nbytes: int, env: dict) -> None:
    os.environ.update(env)
    import torch

    from splitserve.transfer.ucx_backend import _UcxWorker

    dev = torch.device(device, 0) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    w = _UcxWorker(dev)
    ep = w.api.UCXEndpoint.create(w.worker, "127.0.0.1", port, endpoint_error_handling=True)
    buf = torch.ones(nbytes, dtype=torch.uint8, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    req = ep.tag_send(w.array(buf), w.tag(TAG))
    t0 = time.perf_counter()
    while not req.completed and time.perf_counter() - t0 < 20:
        time.sleep(0.001)
    time.sleep(1.0)
    w.stop()


def probe(device: str, nbytes: int, env: dict) -> str:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    r = ctx.Process(target=_recv, args=(q, device, nbytes, env))
    r.start()
    port = q.get(timeout=60)
    s = ctx.Process(target=_send, args=(port, device, nbytes, env))
    s.start()
    try:
        ok, secs, checksum, over_tcp = q.get(timeout=60)
    except Exception as exc:  # noqa: BLE001 - a probe reports every failure as a line
        ok, secs, checksum, over_tcp = False, float("nan"), -1, None
        print(f"  receiver gave no answer: {exc!r}")
    for p in (s, r):
        p.join(10)
        if p.is_alive():
            p.kill()
    # (no bandwidth: the receiver's clock starts before the sender process exists)
    return (f"{device} UCX_TLS={env.get('UCX_TLS', '<unset>')}: completed={ok} after {secs:.2f}s "
            f"checksum={checksum} (want 16) gpu_over_tcp={over_tcp}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    nbytes = args.mib << 20
    variants = [{"UCX_TLS": "tcp,cuda_copy,cuda_ipc,sm,self"}, {"UCX_TLS": "cuda_copy,cuda_ipc,sm,self,tcp", "UCX_MEMTYPE_CACHE": "n"},
                {"UCX_TLS": "all"}]
    for env in variants:
        print(probe(args.device, nbytes, env), flush=True)


if __name__ == "__main__":
    main()
