"""CUDA graphs for decode steps: one graph per (batch bucket, context bucket, prefill bucket), captured on first use.

A decode step of a large model is hundreds of small kernel launches; replaying a captured graph turns them into
one launch, so the CPU stays off the critical path. Inputs live in static device buffers that every graph reads;
a batch is padded up to its bucket with rows that write nowhere (slot -1) and attend to nothing (context 0).
The decode kernel's grid is fixed by the context bucket (``max_context_len``), so each context bucket gets its
own graphs and long contexts never replay a graph captured for shorter ones.

Mixed steps: decode rows plus up to :data:`MAX_PREFILL_ROWS` short prefill rows (agent sessions' new turns, short
prompts prefilled on the decode worker; two turns that arrive during one step share the next) would otherwise run
eagerly, host-bound (15-25 ms for an 8B model against an 8 ms graph step). Their graphs (prefill rows whose tokens
together fit prefill bucket ``q`` > 0, :data:`PREFILL_BUCKETS`) lay the step out as the decode rows, padding rows,
then the prefill rows' tokens one after another, padded to ``q``. The decode rows are attended with the split-K
decode kernel and the prefill rows with the varlen kernel, which reads the rows' bounds from the device
(``cu_mixed``; rows a step lacks are empty), so one graph serves one to :data:`MAX_PREFILL_ROWS` rows of any lengths
within its bucket: a step of two turns replays the graph a step of one turn captured (a capture in serving stalls
its step for about 0.1 s on an H200). :meth:`DecodeGraphs.run` gives the hidden states back in the batch's own order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from splitserve.core.engine.batch import ScheduledBatch
from splitserve.core.engine.runner import to_device
from splitserve.core.model.attention import AttentionBackend, AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256)
PREFILL_BUCKETS = (16, 32, 64, 128, 256)
"""Token counts of the prefill rows a mixed graph carries (all its rows together). Finer buckets were measured and
not kept (ninth session, H200): a 65-token session turn padded to 80 instead of 128 saved 0.25-0.33 ms a step, while
each bucket adds graphs that serving captures on first use (about 0.1 s each)."""
MAX_PREFILL_ROWS = 4
"""Prefill rows one mixed graph carries at most."""

TABLE_ROWS_ONE_BY_ONE = 8
"""At most this many changed page tables are uploaded row by row; more go up as one table."""

GraphKey = tuple[int, int, int]
"""(batch bucket, context bucket, prefill bucket or 0)."""


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
    cu_mixed: torch.Tensor  # int32 [B + 1 + MAX_PREFILL_ROWS]: decode rows, then the prefill rows (filled per step)


class DecodeGraphs:
    """Captures and replays decode steps of ``model`` (hidden states out; logits and sampling stay eager)."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, backend: AttentionBackend,
                 max_batch: int, max_model_len: int, page_size: int) -> None:
        dev = kv_cache.device
        self.model, self.kv_cache, self.backend, self.page_size = model, kv_cache, backend, page_size
        self.max_model_len = max_model_len
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b <= max_batch) or (1,)
        self.prefill_buckets = PREFILL_BUCKETS
        """Token counts of mixed graphs' prefill rows (a benchmark may narrow them, within the largest)."""
        self.ctx_buckets = context_buckets(max_model_len)
        n, max_pages = self.batch_buckets[-1], (max_model_len + page_size - 1) // page_size
        tokens = n + PREFILL_BUCKETS[-1]
        self.static = _Static(
            input_ids=torch.zeros(tokens, dtype=torch.long, device=dev),
            positions=torch.zeros(tokens, dtype=torch.long, device=dev),
            slot_mapping=torch.full((tokens,), -1, dtype=torch.long, device=dev),
            block_tables=torch.zeros(n + MAX_PREFILL_ROWS, max_pages, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(n + MAX_PREFILL_ROWS, dtype=torch.int32, device=dev),
            cu_seqlens_q=torch.arange(n + 1, dtype=torch.int32, device=dev),
            cu_mixed=torch.zeros(n + 1 + MAX_PREFILL_ROWS, dtype=torch.int32, device=dev),
        )
        self.pool = None
        self.graphs: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._tables: list[tuple[int, ...] | None] = [None] * (n + MAX_PREFILL_ROWS)
        """The page table each row of ``static.block_tables`` holds (None: unknown), so a step uploads only the rows
        that changed: a decode row gains a page every ``page_size`` tokens, and the whole table of 32 rows at 3,000
        tokens took about 0.3 ms of host time to build each step."""

    def with_own_buffers(self, max_batch: int) -> "DecodeGraphs":
        """Graphs of the same model and pool, with static inputs and a memory pool of their own (for at most
        ``max_batch`` decode rows): they may replay while this object's graphs run on another stream (the prompt
        lane, core/engine/lane.py)."""
        return type(self)(self.model, self.kv_cache, self.backend, max_batch, self.max_model_len, self.page_size)

    def key(self, batch: ScheduledBatch) -> GraphKey | None:
        """Graph key: for a decode-only batch, or decode rows with at most :data:`MAX_PREFILL_ROWS` prefill rows of
        at most ``PREFILL_BUCKETS[-1]`` tokens together (no prompt logprobs); else None."""
        long = [s for s in batch.seqs if s.num_tokens != 1]
        if len(long) > MAX_PREFILL_ROWS or any(s.prompt_logprobs for s in long):
            return None
        q = bucket_of(sum(s.num_tokens for s in long), self.prefill_buckets) if long else 0
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
        k = MAX_PREFILL_ROWS
        return AttentionMetadata(  # decode kernel for the b rows, varlen kernel for the k after; host lists size grids
            cu_seqlens_q=st.cu_mixed[: b + 1 + k], context_lens=st.context_lens[: b + k],
            block_tables=st.block_tables[: b + k], slot_mapping=st.slot_mapping[: b + q], max_q_len=q,
            max_context_len=c, q_lens=[1] * b + [q] * k, ctx_lens_host=[c] * (b + k), page_size=self.page_size,
            decode_rows=b,
        )

    def _fill(self, batch: ScheduledBatch, b: int, q: int) -> None:
        """Copy the batch into the static buffers (pinned host staging, asynchronous): its decode rows padded to ``b``
        rows, then (``q`` > 0) the prefill rows' tokens one after another, padded to ``q`` (rows it lacks up to
        :data:`MAX_PREFILL_ROWS`: empty, no context)."""
        rows = [s for s in batch.seqs if s.num_tokens == 1]
        long = [s for s in batch.seqs if s.num_tokens != 1]
        pad = b - len(rows)
        ids = [s.token_ids[0] for s in rows] + [0] * pad
        pos = [s.start_pos for s in rows] + [0] * pad
        slots = [slot for s in rows for slot in s.slots(self.page_size)] + [-1] * pad
        ctx = [p + 1 for p in pos[: len(rows)]] + [0] * pad
        st = self.static
        if long:
            cu = list(range(b + 1))
            for i, p in enumerate(long):
                ids += p.token_ids
                pos += range(p.start_pos, p.start_pos + p.num_tokens)
                slots += p.slots(self.page_size)
                ctx.append(p.start_pos + p.num_tokens)
                cu.append(cu[-1] + p.num_tokens)
                self._put_table(b + i, p.page_table)
            tail, empty = b + q - len(ids), MAX_PREFILL_ROWS - len(long)
            ids, pos, slots = ids + [0] * tail, pos + [0] * tail, slots + [-1] * tail
            ctx += [0] * empty
            _copy(st.cu_mixed[: b + 1 + MAX_PREFILL_ROWS], cu + [cu[-1]] * empty)
        for buf, values in ((st.input_ids, ids), (st.positions, pos), (st.slot_mapping, slots), (st.context_lens, ctx)):
            _copy(buf[: len(values)], values)
        self._put_tables(rows)

    def _put_table(self, row: int, table: tuple[int, ...]) -> None:
        """Row ``row`` of the static block tables holds ``table`` (entries past its length keep stale pages, which
        no kernel reads: the row's context bounds them)."""
        if self._tables[row] != table:
            _copy(self.static.block_tables[row, : len(table)], list(table))
            self._tables[row] = table

    def _put_tables(self, rows: list) -> None:
        """The decode rows' page tables: the rows that changed one by one, or all at once when most did."""
        changed = [i for i, s in enumerate(rows) if self._tables[i] != s.page_table]
        if len(changed) <= TABLE_ROWS_ONE_BY_ONE:
            for i in changed:
                self._put_table(i, rows[i].page_table)
            return
        table = ScheduledBatch(seqs=tuple(rows), page_size=self.page_size).block_tables()
        _copy(self.static.block_tables[: len(rows), : len(table[0])], table)
        self._tables[: len(rows)] = [s.page_table for s in rows]

    @staticmethod
    def _mixed_order(batch: ScheduledBatch, b: int) -> list[int]:
        """Each batch token's row in a mixed step's output: decode rows in batch order, the prefill rows' tokens one
        after another from ``b``."""
        rows, order, nxt = iter(range(b)), [], b
        for s in batch.seqs:
            if s.num_tokens == 1:
                order.append(next(rows))
            else:
                order.extend(range(nxt, nxt + s.num_tokens))
                nxt += s.num_tokens
        return order

    def _forward(self, b: int, c: int, q: int) -> torch.Tensor:
        st = self.static
        return self.model(st.input_ids[: b + q], st.positions[: b + q], self.kv_cache, self._meta(b, c, q), self.backend)

    def _inert(self, b: int, q: int) -> None:
        """Static inputs of a (b, q) step that write nowhere and attend to nothing: what a capture runs on."""
        st, k = self.static, MAX_PREFILL_ROWS if q else 0
        st.slot_mapping[: b + q].fill_(-1)
        st.context_lens[: b + k].zero_()
        st.context_lens[b : b + k].fill_(1)  # the prefill rows: the varlen kernel reads their first page
        st.cu_mixed[: b + 1 + k].copy_(torch.arange(b + 1 + k, dtype=torch.int32))

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
        logger.info("captured decode CUDA graph: batch %d, context <= %d%s", b, c,
                    f", prefill rows <= {q} tokens" if q else "")
        return graph, out

    @torch.inference_mode()
    def capture_all(self, mixed: bool = False) -> int:
        """Capture every (batch, context) bucket now, largest batch first so the shared pool is sized once, and one
        mixed graph (one decode row, the shortest prefill bucket), or with ``mixed`` every mixed graph (each batch,
        context and prefill bucket: no step of a turn joining decode rows waits for a capture while serving);
        returns how many graphs exist. Mixed graphs not captured here are captured on first use (about 0.1 s each
        on an H200). The one mixed capture was first added to compile the kernels only mixed steps launch (a
        1.7-2.5 s stall at the first one on a fresh H200, ninth session); the engine's warm-up now compiles every
        kernel variant before it (``kernels.attention.compile_variants``), so it only spares the first such step
        its capture."""
        prefill = self.prefill_buckets if mixed else ()
        for c in self.ctx_buckets:
            for b in reversed(self.batch_buckets):
                for q in (*reversed(prefill), 0):
                    self._capture_once((b, c, q))
        self._capture_once((self.batch_buckets[0], self.ctx_buckets[0], self.prefill_buckets[0]))
        return len(self.graphs)

    def _capture_once(self, key: GraphKey) -> None:
        if key not in self.graphs:
            self.graphs[key] = self._capture(*key)

    @torch.inference_mode()
    def capture_prompt_steps(self) -> int:
        """Capture the graphs of steps of prompts alone (the smallest batch bucket, every context and prefill
        bucket, largest first), as the prompt lane runs them; returns how many graphs exist."""
        b = self.batch_buckets[0]
        for c in reversed(self.ctx_buckets):
            for q in reversed(self.prefill_buckets):
                self._capture_once((b, c, q))
        return len(self.graphs)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, key: GraphKey,
            carry: tuple[list[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states ``[batch tokens, hidden]`` of the step, in the batch's order (a decode-only step: a view of
        the graph's static output).

        ``carry``: (positions among the batch's tokens, their ids int64 ``[k]`` on the device): input ids that are
        still on the device (the previous step's sampled tokens) and replace those tokens' host values.
        """
        self._capture_once(key)
        graph, out = self.graphs[key]
        self._fill(batch, key[0], key[2])
        order = self._mixed_order(batch, key[0]) if key[2] else None
        if carry is not None:
            where = carry[0] if order is None else [order[t] for t in carry[0]]
            self.static.input_ids.index_copy_(0, to_device(where, torch.long, out.device), carry[1])
        graph.replay()
        if order is None:
            return out[: len(batch.seqs)]
        return out.index_select(0, to_device(order, torch.long, out.device))


def _copy(dst: torch.Tensor, values: list) -> None:
    src = torch.tensor(values, dtype=dst.dtype, pin_memory=dst.is_cuda)
    dst.copy_(src, non_blocking=True)
