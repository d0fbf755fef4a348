"""Model runner: turns a :class:`ScheduledBatch` into tensors, runs the model, samples.

Flow of :meth:`ModelRunner.execute`:
1. Build the input ids, positions and attention metadata from the batch (or replay a CUDA graph).
2. Run the model; a ``layer_hook(layer_idx, batch)`` (prefill workers) runs after each layer's K/V are in the pages.
3. Sample the sequences that caught up with their known tokens; when sampling the batch raises, sample row by
   row and report the rows that still raise in :attr:`SeqResult.error` (the engine fails those requests).
4. Add prompt logprobs where asked.

Overlapped steps (greedy rows with nothing else asked: decode tokens, and prompt chunks of any length):
1'. :meth:`ModelRunner.launch` queues steps 1-2 and the logits of each row's last token on the device without
    waiting for them. A row whose input token is the previous step's pending token reads it from that step's device
    tensor, so the host never waits between steps.
2'. Without grammar rows the argmax follows at once (:meth:`InFlight.seal`). With grammar rows the step stays
    unsealed: the engine first finishes the previous step on the host (its tokens advance the matchers), fills the
    rows' bitmask, and :meth:`ModelRunner.seal` applies it on the device and queues the argmax, all while the
    forward pass runs.
3'. The argmax is copied to host memory behind an event, and the :class:`InFlight` reads it later
    (:meth:`InFlight.results`).

It reads nothing but the batch it is handed; the KV pool, the model and the attention backend are
collaborators given at construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from splitserve.core.engine.batch import RunnerOutput, ScheduledBatch, SeqResult, SeqWork, error_text
from splitserve.core.engine.sampler import NO_TOKEN_LEFT, SampleInput, sample_batch, top_logprobs
from splitserve.core.messages import TokenLogprob
from splitserve.core.model.attention import AttentionBackend, AttentionMetadata
from splitserve.core.request import PENDING_TOKEN

if TYPE_CHECKING:
    from splitserve.core.engine.cuda_graphs import DecodeGraphs
    from splitserve.core.engine.grammar import GrammarStates, StepBitmask
    from splitserve.core.engine.lane import PromptLane

logger = logging.getLogger(__name__)

LayerHook = Callable[[int, ScheduledBatch], None]
SampledRow = tuple[int | None, TokenLogprob | None, str | None]
"""(token id, its logprob, error) of one sampled row; an error leaves the other two None."""


@dataclass(frozen=True)
class KVPoolSpec:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_page(self) -> int:
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * elem

    @property
    def shape(self) -> tuple[int, ...]:
        """``[num_layers, 2, num_pages, page_size, num_kv_heads, head_dim]``."""
        return (self.num_layers, 2, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    def allocate(self, device: torch.device) -> torch.Tensor:
        """The pool: :attr:`shape` of ``dtype``, zeroed."""
        return torch.zeros(self.shape, dtype=self.dtype, device=device)


NO_TOKEN = -2
"""Host value of a masked row whose grammar and logits allow no token (never a real id, never on the device)."""


@dataclass
class InFlight:
    """A launched step whose sampled tokens have not been read on the host yet (a row that does not sample, a
    prompt chunk before the last, has a token too: the engine ignores it)."""

    batch: ScheduledBatch
    rows: dict[str, int]
    """request id -> row."""
    logits: torch.Tensor | None = None
    """float32 ``[len(batch.seqs), V]`` on the model's device while the step waits for its grammar mask; then None."""
    scheduled: float = 0.0
    """When the engine began scheduling the step (set by the engine)."""
    launched: float = 0.0
    """When the step was queued (set by the engine, on its clock: core/engine/pacing.py)."""
    graphed: bool = False
    """Whether it replays a CUDA graph."""
    tokens: torch.Tensor | None = None
    """int64 ``[len(batch.seqs)]`` on the model's device: each row's greedy token (set by :meth:`seal`)."""
    host: torch.Tensor | None = None
    """int64 ``[len(batch.seqs)]`` host copy of ``tokens`` (pinned on CUDA; :data:`NO_TOKEN` where a masked row has
    no token left), valid once ``done`` has completed."""
    done: "torch.cuda.Event | None" = None
    placeholders: dict[str, int] = field(default_factory=dict)
    """request id -> index of the row's pending token in the request's ``output_token_ids`` (set by the engine)."""
    retirees: list[str] = field(default_factory=list)
    """Page owner keys to free once this step has completed (set by the engine)."""
    shared: bool = False
    """A step ran on the prompt lane while this one was in flight (core/engine/lane.py): its device time is not its
    own."""

    @classmethod
    def start(cls, batch: ScheduledBatch, logits: torch.Tensor, masked: bool, graphed: bool = False) -> "InFlight":
        """The step of ``batch`` from its logits float32 ``[len(batch.seqs), V]``: sealed at once unless ``masked``
        (it has grammar rows, whose mask comes later through :meth:`ModelRunner.seal`)."""
        flight = cls(batch, {s.request_id: i for i, s in enumerate(batch.seqs)}, logits=logits, graphed=graphed)
        if not masked:
            flight.seal(torch.argmax(logits, dim=-1))
        return flight

    @property
    def sealed(self) -> bool:
        return self.tokens is not None

    def seal(self, tokens: torch.Tensor, report: torch.Tensor | None = None) -> None:
        """Set the step's device tokens int64 ``[len(batch.seqs)]`` and queue their copy to the host (``report``, same
        shape: what the host reads instead, when it differs)."""
        report = tokens if report is None else report
        self.tokens, self.logits = tokens, None
        if not tokens.is_cuda:
            self.host = report
            return
        self.host = torch.empty(report.shape, dtype=report.dtype, pin_memory=True)
        self.host.copy_(report, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def completed(self) -> bool:
        """Whether the device has finished the step (always on CPU, where a step completes at launch)."""
        return self.done is None or self.done.query()

    def results(self) -> RunnerOutput:
        """Wait for the step, then one :class:`SeqResult` per row (an error for a row that had no token left)."""
        if self.host is None:
            raise RuntimeError("the overlapped step was never sealed (its grammar mask was not applied)")
        if self.done is not None:
            self.done.synchronize()
        out = []
        for s, t in zip(self.batch.seqs, self.host.tolist()):
            err = error_text("sampling", ValueError(NO_TOKEN_LEFT)) if t == NO_TOKEN else None
            out.append(SeqResult(s.request_id, None if err else t, error=err))
        return RunnerOutput(results=tuple(out))


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> ``dtype`` tensor ``[len(values)]`` on ``device``; on CUDA through pinned memory without a host
    sync."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def row_ends(batch: ScheduledBatch) -> list[int]:
    """Each row's last token: its index among the step's tokens (all rows' tokens in order)."""
    ends, off = [], -1
    for s in batch.seqs:
        off += s.num_tokens
        ends.append(off)
    return ends


def leading_decode_rows(q_lens: list[int]) -> int:
    """How many sequences at the front of a mixed step have one query token (running requests come first): the
    attention backend gives them the decode kernel, which reads each KV head once for its query group, instead of
    the varlen kernel (measured on an H200: a step of 12 decode rows and a 64-token row spent 6.7 ms in the varlen
    kernel); 0 for a step of one-token rows only (all decode) or one that starts with a longer row."""
    lead = next((i for i, n in enumerate(q_lens) if n != 1), len(q_lens))
    return lead if lead < len(q_lens) else 0


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        backend: AttentionBackend,
        eos_token_ids: frozenset[int],
        layer_hook: LayerHook | None = None,
        graphs: "DecodeGraphs | None" = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.device = kv_cache.device
        self.eos_token_ids = eos_token_ids
        self.layer_hook = layer_hook
        self.hook_filter: Callable[[ScheduledBatch], bool] | None = None
        """Says whether a batch needs the layer hook (steps that need none may replay a CUDA graph)."""
        self.graphs = graphs
        self.grammars: "GrammarStates | None" = None
        """Structured output: the engine's matchers, looked up by request id for each sampled row."""
        self._bitmask: "StepBitmask | None" = None
        """Structured output on overlapped steps: the reused bitmask (created on first use)."""
        self.last_graphed = False
        """Whether the last :meth:`execute` replayed a CUDA graph."""
        self._lane: "PromptLane | None" = None

    def lane(self) -> "PromptLane":
        """The prompt lane (core/engine/lane.py), made on first use: its stream, and graphs of its own."""
        if self._lane is None:
            from splitserve.core.engine.lane import PromptLane

            self._lane = PromptLane(self.device, self.graphs.with_own_buffers(1) if self.graphs is not None else None)
        return self._lane

    def step_streams(self) -> list["torch.cuda.Stream"]:
        """The CUDA streams steps run on: the current one, and the prompt lane's once it is made (none on the CPU)."""
        if self.device.type != "cuda":
            return []
        streams = [torch.cuda.current_stream(self.device)]
        return streams + [self._lane.stream] if self._lane is not None else streams

    def needs_hook(self, batch: ScheduledBatch) -> bool:
        if self.layer_hook is None:
            return False
        return self.hook_filter is None or self.hook_filter(batch)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, in_lane: bool = False) -> RunnerOutput:
        """Run ``batch`` and sample; ``in_lane``: on the prompt lane's stream and graphs (core/engine/lane.py), the
        host waiting for that stream only."""
        if not in_lane:
            return self._execute(batch, self.graphs)
        lane = self.lane()
        with lane.context():
            return self._execute(batch, lane.graphs)

    def _execute(self, batch: ScheduledBatch, graphs: "DecodeGraphs | None") -> RunnerOutput:
        needs_hook = self.needs_hook(batch)
        key = graphs.key(batch) if graphs is not None and not needs_hook else None
        self.last_graphed = key is not None
        if key is not None:
            return self._postprocess(batch, graphs.run(batch, key))
        input_ids, positions, meta = self._prepare(batch)
        if needs_hook:
            hook = self.layer_hook
            meta.on_layer_done = lambda layer: hook(layer, batch)
        hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        return self._postprocess(batch, hidden)

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, prev: InFlight | None) -> InFlight:
        """Queue a step of greedy rows (decode tokens and prompt chunks) without waiting for it (module flow, step 1').

        A row whose last input token is :data:`PENDING_TOKEN` takes ``prev``'s sampled token for the same request, on
        the device. Raises ``ValueError`` when such a row has no row in ``prev``. A batch with grammar rows comes back
        unsealed: call :meth:`seal` once their matchers have filled :meth:`mask_rows`.
        """
        carry = self._carry(batch, prev)
        key = self.graphs.key(batch) if self.graphs is not None else None
        if key is not None:
            hidden = self.graphs.run(batch, key, carry)
        else:
            input_ids, positions, meta = self._prepare(batch)
            if carry is not None:
                input_ids.index_copy_(0, self._tensor(carry[0], torch.long), carry[1])
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        if batch.num_tokens != len(batch.seqs):  # prompt chunks: each row's last token
            hidden = hidden.index_select(0, self._tensor(row_ends(batch), torch.long))
        masked = any(s.params.grammar is not None for s in batch.seqs)
        return InFlight.start(batch, self.model.compute_logits(hidden), masked, key is not None)

    def mask_rows(self, flight: InFlight) -> torch.Tensor:
        """Host int32 ``[len(flight.batch.seqs), ceil(V / 32)]`` bitmask rows of an unsealed step, for the matchers to
        fill (reused every step; see core/engine/grammar.py :class:`StepBitmask`)."""
        if flight.logits is None:
            raise RuntimeError("this overlapped step is already sealed")
        vocab = flight.logits.shape[-1]
        if self._bitmask is None or self._bitmask.vocab_size != vocab:
            from splitserve.core.engine.grammar import StepBitmask

            self._bitmask = StepBitmask(vocab, self.device)
        return self._bitmask.rows(len(flight.batch.seqs))

    @torch.inference_mode()
    def seal(self, flight: InFlight, masked: list[int]) -> None:
        """Mask the ``masked`` rows of ``flight``'s logits with the rows of :meth:`mask_rows`, then queue the argmax
        and its copy to the host (module flow, step 2'). A masked row with no token left reads as :data:`NO_TOKEN`
        on the host; on the device it keeps the argmax (a valid id, for a next step's input that is never used)."""
        logits = flight.logits
        if logits is None:
            raise RuntimeError("this overlapped step is already sealed")
        if not masked:
            flight.seal(torch.argmax(logits, dim=-1))
            return
        if self._bitmask is None:
            raise RuntimeError("masked rows without a bitmask: fill mask_rows(flight) first")
        self._bitmask.apply(logits, masked)
        tokens = torch.argmax(logits, dim=-1)
        best = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)  # -inf only where every token is -inf
        flight.seal(tokens, tokens.masked_fill(best == float("-inf"), NO_TOKEN))

    def _carry(self, batch: ScheduledBatch, prev: InFlight | None) -> tuple[list[int], torch.Tensor] | None:
        """(positions in the step's tokens whose id is pending, their ids int64 ``[k]`` from ``prev`` on the device),
        or None. A pending id is always its request's newest token, so only a row's last token can be one."""
        rows = [i for i, s in enumerate(batch.seqs) if s.token_ids[-1] == PENDING_TOKEN]
        if not rows:
            return None
        ends = row_ends(batch)
        missing = [batch.seqs[i].request_id for i in rows if prev is None or batch.seqs[i].request_id not in prev.rows]
        if missing:
            raise ValueError(f"requests {missing}: pending input token without a step in flight")
        src = self._tensor([prev.rows[batch.seqs[i].request_id] for i in rows], torch.long)
        return [ends[i] for i in rows], prev.tokens.index_select(0, src)

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def _prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ps = batch.page_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens, ctx_lens = [], []
        for s in batch.seqs:
            n = s.num_tokens
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.start_pos + n))
            slots.extend(s.slots(ps))
            q_lens.append(n)
            ctx_lens.append(s.start_pos + n)
        tables = batch.block_tables()
        cu = [0]
        for q in q_lens:
            cu.append(cu[-1] + q)
        meta = AttentionMetadata(
            cu_seqlens_q=self._tensor(cu, torch.int32),
            context_lens=self._tensor(ctx_lens, torch.int32),
            block_tables=self._tensor(tables, torch.int32),
            slot_mapping=self._tensor(slots, torch.int64),
            max_q_len=max(q_lens),
            max_context_len=max(ctx_lens),
            q_lens=q_lens,
            ctx_lens_host=ctx_lens,
            page_size=ps,
            decode_rows=leading_decode_rows(q_lens),
        )
        return self._tensor(ids, torch.long), self._tensor(pos, torch.long), meta

    def _postprocess(self, batch: ScheduledBatch, hidden: torch.Tensor) -> RunnerOutput:
        ends = row_ends(batch)
        starts = [e - s.num_tokens + 1 for e, s in zip(ends, batch.seqs)]
        sampling = [i for i, s in enumerate(batch.seqs) if s.sample]
        tokens: dict[int, SampledRow] = {}
        if sampling:
            logits = self.model.compute_logits(hidden[[ends[i] for i in sampling]])
            tokens = dict(zip(sampling, self._sample(logits, [batch.seqs[i] for i in sampling])))
        results = []
        for i, s in enumerate(batch.seqs):
            tok, lp, err = tokens.get(i, (None, None, None))
            plp = self._prompt_logprobs(s, hidden[starts[i] : ends[i] + 1]) if s.prompt_logprobs and not err else ()
            results.append(SeqResult(request_id=s.request_id, token_id=tok, logprob=lp, prompt_logprobs=plp, error=err))
        return RunnerOutput(results=tuple(results))

    def _sample(self, logits: torch.Tensor, seqs: list[SeqWork]) -> list[SampledRow]:
        """(token, logprob, error) per row: the whole batch at once, or row by row when that raises, so that
        only the rows that raise fail (their requests fail; the others get the tokens they would have had)."""
        inputs = [self._sample_input(s) for s in seqs]
        try:
            toks, lps = sample_batch(logits, inputs)
            return [(t, lp, None) for t, lp in zip(toks, lps)]
        except Exception as exc:  # isolation boundary: the rows are retried one by one below, the failures reported
            logger.info("requests %s: sampling the batch raised %s; sampling row by row",
                        ",".join(s.request_id for s in seqs), type(exc).__name__)
        rows: list[SampledRow] = []
        for r, inp in enumerate(inputs):
            try:
                toks, lps = sample_batch(logits[r : r + 1], [inp])
                rows.append((toks[0], lps[0], None))
            except Exception as exc:  # this request's own fault: the engine fails it and logs the error
                rows.append((None, None, error_text("sampling", exc)))
        return rows

    def _sample_input(self, s: SeqWork) -> SampleInput:
        return SampleInput(
            params=s.params,
            prompt_token_ids=s.prompt_token_ids,
            output_token_ids=s.output_token_ids,
            eos_token_ids=self.eos_token_ids,
            grammar=self.grammars.get(s.request_id) if self.grammars is not None and s.params.grammar else None,
        )

    def _prompt_logprobs(self, s: SeqWork, hidden: torch.Tensor) -> tuple:
        """Logprobs of prompt tokens ``start_pos + 1 .. min(end, prompt_len - 1)`` predicted by this chunk."""
        prompt = s.prompt_token_ids
        last = min(s.start_pos + s.num_tokens, len(prompt) - 1)  # position whose successor is the last prompt token
        n = last - s.start_pos
        if n <= 0:
            return ()
        lp = torch.log_softmax(self.model.compute_logits(hidden[:n]).float(), dim=-1).cpu()
        k = s.params.prompt_logprobs or 0
        return tuple(top_logprobs(lp[j], prompt[s.start_pos + 1 + j], k) for j in range(n))
