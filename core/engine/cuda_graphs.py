"""CUDA graphs for decode-only steps: one graph per (batch bucket, context bucket), captured on first use.

A decode step of a large model is hundreds of small kernel launches; replaying a captured graph turns them into
one launch, so the CPU stays off the critical path. Inputs live in static device buffers that every graph reads;
a batch is padded up to its bucket with rows that write nowhere (slot -1) and attend to nothing (context 0).
The decode kernel's grid is fixed by the context bucket (``max_context_len``), so each context bucket gets its
own graphs and long contexts never replay a graph captured for shorter ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.core.engine.batch import ScheduledBatch
from splitserve.core.model.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def context_buckets(max_len: int) -> list[int]:
    """1024, 2048, 4096, ... capped by (and ending at) ``max_len``: a context just past a bucket runs a decode grid
    at most twice its need (x4 steps put 4096-token prompts plus their outputs on a grid for 16384)."""
    out, c = [], 1024
    while c < max_len:
        out.append(c)
        c *= 2
    return out + [max_len]


def bucket_of(value: int, buckets: list[int] | tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


@dataclass
class _Static:
    """Device buffers every graph reads (sized for the largest bucket)."""

    input_ids: torch.Tensor  # int64 [B]
    positions: torch.Tensor  # int64 [B]
    slot_mapping: torch.Tensor  # int64 [B]
    block_tables: torch.Tensor  # int32 [B, max_pages]
    context_lens: torch.Tensor  # int32 [B]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1] = arange


class DecodeGraphs:
    """Captures and replays decode steps of ``model`` (hidden states out; logits and sampling stay eager)."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, backend: AttentionBackend,
                 max_batch: int, max_model_len: int, page_size: int) -> None:
        dev = kv_cache.device
        self.model, self.kv_cache, self.backend, self.page_size = model, kv_cache, backend, page_size
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b <= max_batch) or (1,)
        self.ctx_buckets = context_buckets(max_model_len)
        n, max_pages = self.batch_buckets[-1], (max_model_len + page_size - 1) // page_size
        self.static = _Static(
            input_ids=torch.zeros(n, dtype=torch.long, device=dev),
            positions=torch.zeros(n, dtype=torch.long, device=dev),
            slot_mapping=torch.full((n,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(n, max_pages, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(n, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
        )
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def key(self, batch: ScheduledBatch) -> tuple[int, int] | None:
        """Graph key for a decode-only batch, or None when it has prefill chunks or is too big."""
        if any(s.num_tokens != 1 for s in batch.seqs):
            return None
        b = bucket_of(len(batch.seqs), self.batch_buckets)
        c = bucket_of(max(s.start_pos + 1 for s in batch.seqs), self.ctx_buckets)
        return None if b is None or c is None else (b, c)

    def _meta(self, b: int, c: int) -> AttentionMetadata:
        st = self.static
        return AttentionMetadata(
            cu_seqlens_q=st.cu_seqlens_q[: b + 1], context_lens=st.context_lens[:b], block_tables=st.block_tables[:b],
            slot_mapping=st.slot_mapping[:b], max_q_len=1, max_context_len=c, q_lens=[1] * b, ctx_lens_host=[c] * b,
            page_size=self.page_size,
        )

    def _fill(self, batch: ScheduledBatch, b: int) -> None:
        """Copy the batch into the static buffers (pinned host staging, asynchronous) and pad to ``b`` rows."""
        n = len(batch.seqs)
        pos = [s.start_pos for s in batch.seqs]
        ids = [s.token_ids[0] for s in batch.seqs]
        slots = [slot for s in batch.seqs for slot in s.slots(self.page_size)]  # one token each
        table = batch.block_tables()
        width = len(table[0])
        pad = b - n
        st = self.static
        _copy(st.input_ids[:b], ids + [0] * pad)
        _copy(st.positions[:b], pos + [0] * pad)
        _copy(st.slot_mapping[:b], slots + [-1] * pad)
        _copy(st.context_lens[:b], [p + 1 for p in pos] + [0] * pad)
        _copy(st.block_tables[:n, :width], table)

    def _forward(self, b: int, c: int) -> torch.Tensor:
        st = self.static
        return self.model(st.input_ids[:b], st.positions[:b], self.kv_cache, self._meta(b, c), self.backend)

    def _capture(self, b: int, c: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.static.slot_mapping[:b].fill_(-1)
        self.static.context_lens[:b].zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles the allocator
                self._forward(b, c)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, c)
        logger.info("captured decode CUDA graph: batch %d, context <= %d", b, c)
        return graph, out

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every (batch, context) bucket now, largest batch first so the shared pool is sized once;
        returns how many graphs exist. Serving then never pays a capture (or a kernel compile) mid-request."""
        for c in self.ctx_buckets:
            for b in reversed(self.batch_buckets):
                if (b, c) not in self.graphs:
                    self.graphs[(b, c)] = self._capture(b, c)
        return len(self.graphs)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, key: tuple[int, int],
            carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states ``[len(batch.seqs), hidden]`` of the step (a view of the graph's static output).

        ``carry``: (rows int64 ``[k]``, token ids int64 ``[k]``), both on the device: input ids that are still on the
        device (the previous step's sampled tokens) and replace those rows' host values.
        """
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, out = self.graphs[key]
        self._fill(batch, key[0])
        if carry is not None:
            self.static.input_ids.index_copy_(0, *carry)
        graph.replay()
        return out[: len(batch.seqs)]


def _copy(dst: torch.Tensor, values: list) -> None:
    src = torch.tensor(values, dtype=dst.dtype, pin_memory=True)
    dst.copy_(src, non_blocking=True)
