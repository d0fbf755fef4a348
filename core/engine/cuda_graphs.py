"""CUDA graphs for decode steps: one graph per (batch bucket, context bucket, prefill bucket), captured on first use.

A decode step of a large model is hundreds of small kernel launches; replaying a captured graph turns them into
one launch, so the CPU stays off the critical path. Inputs live in static device buffers that every graph reads;
a batch is padded up to its bucket with rows that write nowhere (slot -1) and attend to nothing (context 0).
The decode kernel's grid is fixed by the context bucket (``max_context_len``), so each context bucket gets its
own graphs and long contexts never replay a graph captured for shorter ones.

Mixed steps: decode rows plus ONE short prefill row (an agent session's new turn, a short prompt prefilled on the
decode worker) would otherwise run eagerly, host-bound (15-25 ms for an 8B model against an 8 ms graph step). Their
graphs (prefill bucket ``q`` > 0, :data:`PREFILL_BUCKETS`) lay the step out as the decode rows, padding rows, then the
prefill row's tokens padded to ``q``. The decode rows are attended with the split-K decode kernel and the prefill row
with the varlen kernel, which reads its rows from the device (``cu_mixed``), so one graph serves any row length
within its bucket. :meth:`DecodeGraphs.run` gives the hidden states back in the batch's own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.core.engine.batch import ScheduledBatch
from splitserve.core.model.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
PREFILL_BUCKETS = (16, 32, 64, 128)
"""Token counts of the one prefill row a mixed graph carries."""


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
    cu_mixed: torch.Tensor  # int32 [B + 2]: decode rows, then the prefill row (filled per step)


class DecodeGraphs:
    """Captures and replays decode steps of ``model`` (hidden states out; logits and sampling stay eager)."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, backend: AttentionBackend,
                 max_batch: int, max_model_len: int, page_size: int) -> None:
        dev = kv_cache.device
        self.model, self.kv_cache, self.backend, self.page_size = model, kv_cache, backend, page_size
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b <= max_batch) or (1,)
        self.ctx_buckets = context_buckets(max_model_len)
        n, max_pages = self.batch_buckets[-1], (max_model_len + page_size - 1) // page_size
        tokens = n + PREFILL_BUCKETS[-1]
        self.static = _Static(
            input_ids=torch.zeros(tokens, dtype=torch.long, device=dev),
            positions=torch.zeros(tokens, dtype=torch.long, device=dev),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(n + 1, max_pages, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(n + 1, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
            cu_mixed=torch.zeros(n + 2, dtype=torch.int32, device=dev),
        )
        self.pool = None
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def key(self, batch: ScheduledBatch) -> tuple[int, int, int] | None:
        """Graph key ``(batch bucket, context bucket, prefill bucket or 0)``: for a decode-only batch, or decode rows
        with one prefill row of at most ``PREFILL_BUCKETS[-1]`` tokens (no prompt logprobs); else None."""
        long = [s for s in batch.seqs if s.num_tokens != 1]
        if len(long) > 1 or any(s.prompt_logprobs for s in long):
            return None
        q = bucket_of(long[0].num_tokens, PREFILL_BUCKETS) if long else 0
        b = bucket_of(max(1, len(batch.seqs) - len(long)), self.batch_buckets)
        c = bucket_of(max(s.start_pos + s.num_tokens for s in batch.seqs), self.ctx_buckets)
        return None if b is None or c is None or q is None else (b, c, q)

    def _meta(self, b: int, c: int, q: int) -> AttentionMetadata:
        st = self.static
        if not q:
            return AttentionMetadata(
                cu_seqlens_q=st.cu_seqlens_q[: b + 1], context_lens=st.context_lens[:b], block_tables=st.block_tables[:b],
                slot_mapping=st.slot_mapping[:b], max_q_len=1, max_context_len=c, q_lens=[1] * b,
                ctx_lens_host=[c] * b, page_size=self.page_size,
            )
        return AttentionMetadata(  # decode kernel for the b rows, varlen kernel for the last; host lists size grids
            cu_seqlens_q=st.cu_mixed[: b + 2], context_lens=st.context_lens[: b + 1],
            block_tables=st.block_tables[: b + 1], slot_mapping=st.slot_mapping[: b + q], max_q_len=q,
            max_context_len=c, q_lens=[1] * b + [q], ctx_lens_host=[c] * (b + 1), page_size=self.page_size,
            decode_rows=b,
        )

    def _fill(self, batch: ScheduledBatch, b: int, q: int) -> None:
        """Copy the batch into the static buffers (pinned host staging, asynchronous): its decode rows padded to ``b``
        rows, then (``q`` > 0) the prefill row's tokens padded to ``q``."""
        rows = [s for s in batch.seqs if s.num_tokens == 1]
        long = [s for s in batch.seqs if s.num_tokens != 1]
        pad = b - len(rows)
        ids = [s.token_ids[0] for s in rows] + [0] * pad
        pos = [s.start_pos for s in rows] + [0] * pad
        slots = [slot for s in rows for slot in s.slots(self.page_size)] + [-1] * pad
        ctx = [p + 1 for p in pos[: len(rows)]] + [0] * pad
        st = self.static
        if long:
            p, n = long[0], long[0].num_tokens
            ids += [*p.token_ids, *[0] * (q - n)]
            pos += [*range(p.start_pos, p.start_pos + n), *[0] * (q - n)]
            slots += [*p.slots(self.page_size), *[-1] * (q - n)]
            ctx.append(p.start_pos + n)
            _copy(st.cu_mixed[: b + 2], [*range(b + 1), b + n])
            _copy(st.block_tables[b, : len(p.page_table)], list(p.page_table))
        for buf, values in ((st.input_ids, ids), (st.positions, pos), (st.slot_mapping, slots), (st.context_lens, ctx)):
            _copy(buf[: len(values)], values)
        if rows:
            table = ScheduledBatch(seqs=tuple(rows), page_size=self.page_size).block_tables()
            _copy(st.block_tables[: len(rows), : len(table[0])], table)

    @staticmethod
    def _mixed_order(batch: ScheduledBatch, b: int) -> list[int]:
        """Each batch token's row in a mixed step's output: decode rows in batch order, the prefill row from ``b``."""
        rows = iter(range(b))
        return [b + j if s.num_tokens != 1 else next(rows) for s in batch.seqs for j in range(s.num_tokens)]

    def _forward(self, b: int, c: int, q: int) -> torch.Tensor:
        st = self.static
        return self.model(st.input_ids[: b + q], st.positions[: b + q], self.kv_cache, self._meta(b, c, q), self.backend)

    def _inert(self, b: int, q: int) -> None:
        """Static inputs of a (b, q) step that write nowhere and attend to nothing: what a capture runs on."""
        st = self.static
        st.slot_mapping[: b + q].fill_(-1)
        st.context_lens[: b + 1].zero_()
        st.context_lens[b : b + 1].fill_(1 if q else 0)  # the prefill row: the varlen kernel reads its first page
        st.cu_mixed[: b + 2].copy_(torch.arange(b + 2, dtype=torch.int32))

    def _capture(self, b: int, c: int, q: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._inert(b, q)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles the allocator
                self._forward(b, c, q)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, c, q)
        logger.info("captured decode CUDA graph: batch %d, context <= %d%s", b, c, f", a prefill row <= {q}" if q else "")
        return graph, out

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every (batch, context) bucket now, largest batch first so the shared pool is sized once;
        returns how many graphs exist. Serving then never pays a capture (or a kernel compile) mid-request."""
        for c in self.ctx_buckets:
            for b in reversed(self.batch_buckets):
                if (b, c, 0) not in self.graphs:
                    self.graphs[(b, c, 0)] = self._capture(b, c, 0)
        return len(self.graphs)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, key: tuple[int, int, int],
            carry: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states ``[batch tokens, hidden]`` of the step, in the batch's order (a decode-only step: a view of
        the graph's static output).

        ``carry`` (decode-only steps): (rows int64 ``[k]``, token ids int64 ``[k]``), both on the device: input ids
        that are still on the device (the previous step's sampled tokens) and replace those rows' host values.
        """
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)
        graph, out = self.graphs[key]
        self._fill(batch, key[0], key[2])
        if carry is not None:
            self.static.input_ids.index_copy_(0, *carry)
        graph.replay()
        if not key[2]:
            return out[: len(batch.seqs)]
        order = torch.tensor(self._mixed_order(batch, key[0]), dtype=torch.long, pin_memory=out.is_cuda)
        return out.index_select(0, order.to(out.device, non_blocking=True))


def _copy(dst: torch.Tensor, values: list) -> None:
    src = torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda)
    dst.copy_(src, non_blocking=True)
