"""Structured output: grammars compiled by xgrammar, one matcher per request, token bitmasks for the sampler.

Flow of one constrained request on a worker:

1. The router sets ``SamplingParams.grammar = (kind, spec)`` (kinds: :data:`KINDS`); it travels in the typed wire
   messages to the prefill and decode workers.
2. :meth:`GrammarStates.add` (the engine, when the request is added): on first use it builds xgrammar's
   ``TokenizerInfo`` from the worker's tokenizer (vocabulary strings, vocabulary type, the engine's EOS ids as stop
   tokens), then compiles the spec through :class:`GrammarCache` (an LRU keyed by ``(kind, spec)``; JSON schemas are
   compact, no free whitespace, and length-bounded strings go through :func:`bounded_strings_as_patterns`) and keeps a
   ``GrammarMatcher`` for the request id. A spec xgrammar refuses raises ``ValueError`` naming the field; the worker
   fails the request with it.
3. A decode worker continuing a request prefilled elsewhere replays the first token into its fresh matcher
   (:meth:`GrammarStates.accept`) before it masks token 1.
4. Each synchronous step, :func:`apply_masks` (called by the sampler) fills one bitmask row per constrained row from
   its matcher and applies it to the logits with xgrammar's kernel (CPU, or CUDA where the logits are): tokens the
   grammar does not allow become -inf.
   Overlapped decode steps (greedy rows with nothing else asked; core/engine/engine.py): step N+1's forward is queued
   first; once step N's tokens were fed to the matchers (step 5), they fill the rows of one preallocated
   :class:`StepBitmask` (pinned host memory on CUDA), which is uploaded on a side stream and applied on the device
   just before the step's argmax.
5. The engine feeds every sampled token to :meth:`GrammarStates.accept`: a refused token fails the request, a matcher
   that terminates (the grammar is complete and its stop token was taken) finishes it with ``"stop"``.
6. :meth:`GrammarStates.retain` drops the matchers of requests that left the engine.

xgrammar (and torch, which it imports) is imported on first use, so workers that never see a grammar never load it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

if TYPE_CHECKING:
    import torch

    from splitserve.core.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

KINDS = ("json", "json_object", "regex", "choice", "grammar")
"""``json``: a JSON schema (text); ``json_object``: any JSON object (spec unused); ``regex``: a regular expression;
``choice``: a JSON array of strings, the output is one of them; ``grammar``: an EBNF grammar (xgrammar's dialect)."""

FIELD_OF_KIND = {
    "json": "response_format/guided_json/tools",
    "json_object": "response_format",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
}
"""The request field a kind comes from, for error messages: ``invalid grammar in <field>: <reason>`` (the router
answers that with a 400 naming the field)."""

DEFAULT_CACHE_SIZE = 256
BATCH_FILL_MIN_ROWS = 16
"""Below this many rows a threaded bitmask fill costs more in dispatch than it saves."""
_XGR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def tokenizer_info(tokenizer: "Tokenizer", vocab_size: int, stop_token_ids: Collection[int]) -> Any:
    """xgrammar's ``TokenizerInfo`` for ``tokenizer`` and a model whose logits have ``vocab_size`` entries.

    Special tokens get empty strings (xgrammar never allows them inside the grammar; the stop tokens are allowed
    where the grammar may end); ids past the tokenizer's vocabulary are never allowed.
    """
    xgr = _xgr()
    encoded = [""] * vocab_size
    for token, idx in tokenizer.backend.get_vocab(with_added_tokens=True).items():
        if idx < vocab_size:
            encoded[idx] = token
    for idx in tokenizer.all_special_ids:
        if idx < vocab_size:
            encoded[idx] = ""
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tokenizer.backend.to_str())
    stops = sorted(i for i in stop_token_ids if 0 <= i < vocab_size)
    return xgr.TokenizerInfo(encoded, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=stops or None,
                             add_prefix_space=meta["add_prefix_space"])


def choice_ebnf(choices: Sequence[str]) -> str:
    """EBNF whose language is exactly ``choices`` (JSON string escapes are valid EBNF string literals)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


_PLAIN_CHAR = r'[^\x00-\x1f"\\]'
"""A string character that needs no escape in JSON."""
_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})
"""Schema keywords whose values are data, not schemas (left as they are)."""
MAX_LENGTH_AS_PATTERN = 256
"""Bounds above this stay xgrammar's own (a larger counted repetition compiles slowly: {5000,} takes 13 s)."""


def bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each length-bounded string (``minLength`` / ``maxLength``, no ``pattern`` or ``format``)
    written as a ``pattern`` of that many characters that need no escape.

    xgrammar 0.2.9 compiles length-bounded strings into a grammar that lets raw control characters (U+0000-U+001F)
    through, which is not JSON; the pattern keeps the length bounds and excludes them (and, as xgrammar does for
    such strings anyway, escape sequences). Bounds above :data:`MAX_LENGTH_AS_PATTERN` are left to xgrammar.
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out:
        lo, hi = out.get("minLength", 0), out.get("maxLength")
        if _small_int(lo) and (hi is None or _small_int(hi)):
            out.pop("minLength", None), out.pop("maxLength", None)
            out["pattern"] = f"^{_PLAIN_CHAR}{{{int(lo)},{'' if hi is None else int(hi)}}}$"
    return out


def _small_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_LENGTH_AS_PATTERN


class GrammarCache:
    """Compiled grammars, least recently used dropped beyond ``capacity``; owns xgrammar's compiler."""

    def __init__(self, info: Any, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        self.compiler = _xgr().GrammarCompiler(info, cache_enabled=False)
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, kind: str, spec: str) -> Any:
        """The compiled grammar of ``(kind, spec)``; ``ValueError`` naming the field when it does not compile."""
        key = (kind, spec)
        if key in self._items:
            self.hits += 1
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        try:
            compiled = self._compile(kind, spec)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar's parse errors are RuntimeErrors
            reason = _XGR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise ValueError(f"invalid grammar in {FIELD_OF_KIND.get(kind, kind)}: {reason}") from exc
        self._items[key] = compiled
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return compiled

    def _compile(self, kind: str, spec: str) -> Any:
        c = self.compiler
        if kind == "json":
            return c.compile_json_schema(json.dumps(bounded_strings_as_patterns(json.loads(spec))),
                                         any_whitespace=False)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', any_whitespace=False)
        if kind == "regex":
            return c.compile_regex(spec)
        if kind == "choice":
            choices = json.loads(spec)
            if not isinstance(choices, list) or not choices or not all(isinstance(x, str) for x in choices):
                raise ValueError("must be a non-empty list of strings")
            return c.compile_grammar(choice_ebnf(choices))
        if kind == "grammar":
            return c.compile_grammar(spec)
        raise ValueError(f"unknown grammar kind {kind!r} (known: {', '.join(KINDS)})")


class RequestGrammar:
    """One request's matcher: the state after the tokens it accepted."""

    __slots__ = ("request_id", "matcher")

    def __init__(self, request_id: str, matcher: Any) -> None:
        self.request_id = request_id
        self.matcher = matcher

    def fill(self, bitmask: "torch.Tensor", row: int) -> None:
        """Row ``row`` of ``bitmask``: the tokens allowed next."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class GrammarStates:
    """Per engine: the tokenizer info and compiled-grammar cache (built on first use) and one matcher per request."""

    def __init__(self, load_tokenizer: Callable[[], "Tokenizer"], vocab_size: int, stop_token_ids: Collection[int],
                 cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = frozenset(stop_token_ids)
        self.cache_size = cache_size
        self._cache: GrammarCache | None = None
        self._states: dict[str, RequestGrammar] = {}
        self._batch_matcher: Any = None
        self.batch_fill_min_rows = BATCH_FILL_MIN_ROWS
        """:meth:`fill_rows` fills this many rows or more in one threaded call (fewer: row by row, cheaper)."""

    def __len__(self) -> int:
        return len(self._states)

    @property
    def cache(self) -> GrammarCache:
        if self._cache is None:
            info = tokenizer_info(self._load_tokenizer(), self.vocab_size, self.stop_token_ids)
            self._cache = GrammarCache(info, self.cache_size)
            logger.info("structured output ready: xgrammar vocabulary of %d tokens", self.vocab_size)
        return self._cache

    def add(self, request_id: str, grammar: tuple[str, str]) -> RequestGrammar:
        """Compile (or reuse) the grammar and start a matcher for ``request_id``; ``ValueError`` if it is invalid."""
        kind, spec = grammar
        if kind not in KINDS:
            raise ValueError(f"unknown grammar kind {kind!r} (known: {', '.join(KINDS)})")
        compiled = self.cache.get(kind, spec)
        state = RequestGrammar(request_id, _xgr().GrammarMatcher(compiled))
        self._states[request_id] = state
        logger.debug("request %s: %s grammar ready (%d cached)", request_id, kind, len(self.cache))
        return state

    def get(self, request_id: str) -> RequestGrammar | None:
        return self._states.get(request_id) if self._states else None

    def accept(self, request_id: str, token_id: int) -> str | None:
        """Advance the request's matcher: ``"stop"`` once it terminates, else None (also for unconstrained requests).
        Raises ``ValueError`` when the grammar does not allow ``token_id``."""
        state = self.get(request_id)
        if state is None:
            return None
        if not state.accept(token_id):
            raise ValueError(f"token {token_id} is not allowed by the request's grammar")
        return "stop" if state.terminated else None

    def fill_rows(self, bitmask: "torch.Tensor", rows: Sequence[tuple[int, str]]) -> list[tuple[str, Exception]]:
        """Fill row ``row`` of host int32 ``bitmask`` ``[N, ceil(V / 32)]`` from the matcher of ``request_id`` for each
        ``(row, request_id)`` (every id must have a matcher). From :attr:`batch_fill_min_rows` rows on, in one call on
        xgrammar's threads; when that raises, row by row. Returns ``(request id, exception)`` for each matcher that
        raised (its row is left as it was), so that only those requests fail."""
        states = [(row, self._states[rid]) for row, rid in rows]
        if len(states) >= self.batch_fill_min_rows:
            try:
                self.batch_matcher.batch_fill_next_token_bitmask(
                    [st.matcher for _, st in states], bitmask, [row for row, _ in states])
                return []
            except (RuntimeError, ValueError, TypeError) as exc:  # retried row by row below, the failures returned
                logger.info("requests %s: filling the bitmask in one call raised %s; filling row by row",
                            ",".join(st.request_id for _, st in states), type(exc).__name__)
        failed: list[tuple[str, Exception]] = []
        for row, state in states:
            try:
                state.fill(bitmask, row)
            except (RuntimeError, ValueError, TypeError) as exc:  # this request's matcher: the caller fails it
                failed.append((state.request_id, exc))
        return failed

    @property
    def batch_matcher(self) -> Any:
        """xgrammar's ``BatchGrammarMatcher`` (its own threads: half the host's cores), created on first use."""
        if self._batch_matcher is None:
            self._batch_matcher = _xgr().BatchGrammarMatcher("auto")
        return self._batch_matcher

    def discard(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    def retain(self, live: Collection[str]) -> None:
        """Forget the matchers of requests not in ``live`` (finished, aborted or failed)."""
        for rid in [r for r in self._states if r not in live]:
            del self._states[rid]


def apply_masks(logits: "torch.Tensor", rows: Sequence[tuple[int, RequestGrammar]]) -> None:
    """Mask ``logits`` ``[N, V]`` in place: in each listed row, tokens its grammar does not allow become -inf.

    One bitmask for the batch, filled on the host by the matchers, then applied by xgrammar's kernel on the logits'
    device (float32 / float16 / bfloat16 logits; other dtypes through a float32 copy).
    """
    if not rows:
        return
    bitmask = _xgr().allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row, state in rows:
        state.fill(bitmask, row)
    indices = [row for row, _ in rows]
    if logits.is_cuda:
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    apply_bitmask(logits, bitmask, indices)


def apply_bitmask(logits: "torch.Tensor", bitmask: "torch.Tensor", indices: Sequence[int] | None = None) -> None:
    """xgrammar's kernel on the logits' device: ``logits`` ``[N, V]`` (float32 / float16 / bfloat16 in place, other
    float dtypes through a float32 copy) and ``bitmask`` int32 ``[N, ceil(V / 32)]`` on the same device; where bit
    ``j`` of row ``i`` is 0, ``logits[i, j]`` becomes -inf. ``indices``: only those rows (None: every row)."""
    import torch

    xgr = _xgr()
    idx = None if indices is None else list(indices)
    if logits.dtype in (torch.float32, torch.float16, torch.bfloat16):
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=idx)
        return
    tmp = logits.float()
    xgr.apply_token_bitmask_inplace(tmp, bitmask, indices=idx)
    logits.copy_(tmp)


def apply_bitmask_reference(logits: "torch.Tensor", bitmask: "torch.Tensor") -> "torch.Tensor":
    """Torch reference of :func:`apply_bitmask` over every row, for the tests: float ``[N, V]`` logits and int32
    ``[N, ceil(V / 32)]`` bitmask -> new logits with -inf where the token's bit is 0."""
    import torch

    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, : logits.shape[-1]]
    return logits.masked_fill(bits == 0, float("-inf"))


ALL_ALLOWED = -1
"""An int32 bitmask word with every bit set: a row of them leaves its logits as they are."""


class StepBitmask:
    """The token bitmask of overlapped decode steps (module flow, step 4), allocated once and reused every step.

    ``host``: int32 ``[capacity, ceil(V / 32)]`` that the matchers fill (pinned on CUDA); ``device_rows``: the same
    shape on the logits' device (the host buffer itself on CPU). On CUDA the upload runs on a side stream, so it overlaps
    the forward pass queued before it, and the compute stream waits for it before the kernel reads it. The host rows
    are handed out again only after the previous upload from them has completed (:meth:`rows`), and an upload waits
    for the previous kernel that read the device rows; both are normally long done, so neither wait costs anything.
    """

    def __init__(self, vocab_size: int, device: "torch.device", capacity: int = 64) -> None:
        import torch

        self.vocab_size = vocab_size
        self.width = (vocab_size + 31) // 32
        self.device = device
        self.cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._uploaded: "torch.cuda.Event | None" = None
        """Recorded on the side stream after the last upload: the host rows are free once it has completed."""
        self._applied: "torch.cuda.Event | None" = None
        """Recorded on the compute stream after the last kernel: the device rows are free once it has completed."""
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        import torch

        self.capacity = capacity
        self.host = torch.full((capacity, self.width), ALL_ALLOWED, dtype=torch.int32, pin_memory=self.cuda)
        self.device_rows = torch.empty_like(self.host, device=self.device) if self.cuda else self.host

    def rows(self, n: int) -> "torch.Tensor":
        """Host int32 ``[n, ceil(V / 32)]`` to fill for a step of ``n`` rows (contents left from earlier steps)."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        if n > self.capacity:
            if self._applied is not None:
                self._applied.synchronize()  # the old device rows may still be read
            self._allocate(max(n, 2 * self.capacity))
        return self.host[:n]

    def apply(self, logits: "torch.Tensor", masked: Sequence[int]) -> None:
        """Mask ``logits`` ``[n, V]`` (on :attr:`device`) in place with the ``masked`` rows of :meth:`rows`; the other
        rows stay as they are."""
        if not masked:
            return
        if not self.cuda:
            apply_bitmask(logits, self.host[: logits.shape[0]], masked)
            return
        import torch

        n = logits.shape[0]
        rest = sorted(set(range(n)) - set(masked))
        if rest:  # every row goes through the kernel (no index list to upload): the others allow everything
            self.host[:n].index_fill_(0, torch.tensor(rest, dtype=torch.long), ALL_ALLOWED)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            if self._applied is not None:
                self._stream.wait_event(self._applied)
            self.device_rows[:n].copy_(self.host[:n], non_blocking=True)
            self._uploaded = torch.cuda.Event()
            self._uploaded.record(self._stream)
        compute.wait_event(self._uploaded)
        apply_bitmask(logits, self.device_rows[:n])
        self._applied = torch.cuda.Event()
        self._applied.record(compute)
