"""Turning a worker's token stream into OpenAI text: incremental detokenization, router-side stop
strings, and logprob formatting for completions and chat.

Workers stop on EOS, stop token ids and max_tokens. Stop *strings* are the router's job:
:class:`~splitserve.core.tokenizer.StopChecker` holds back the tail of text that could still become a
stop string, so a stop string spanning several tokens (or several messages) is trimmed exactly and
never streamed to the client even partially (unless ``include_stop_str_in_output``: then it ends the text).
:attr:`OutputProcessor.stop_reason` says what ended the output: the stop string, or the requested stop token id
(vLLM's ``stop_reason``; ``None`` for EOS and length). An echo-only request (``max_tokens=0`` with ``echo``)
drops the one token its worker generated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from splitserve.core.messages import TokenLogprob, TokenOut
from splitserve.core.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer


class WorkerFailed(RuntimeError):
    """The worker ended the request with an error (or the request was lost)."""


@dataclass
class Delta:
    """What one worker message adds to the response."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


@dataclass
class OutputProcessor:
    """Per-request state: detokenizer, stop strings, token counts."""

    request_id: str
    detokenizer: IncrementalDetokenizer
    stops: StopChecker
    completion_tokens: int = 0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    finished: bool = False
    stopped_by_string: bool = False
    stop_token_ids: frozenset[int] = frozenset()
    """The request's own stop token ids (for :attr:`stop_reason`)."""
    include_stop_str: bool = False
    echo_only: bool = False
    stop_reason: str | int | None = None

    def process(self, out: TokenOut) -> Delta:
        """Apply one ``TokenOut``; raises :class:`WorkerFailed` on an error or abort from the worker."""
        if out.finish_reason in ("error", "abort"):
            self.finished = True
            raise WorkerFailed(out.error or f"request {self.request_id} was aborted by the worker")
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_prompt_tokens = out.num_prompt_tokens or self.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        if self.echo_only:
            self.finished = out.finish_reason is not None
            return Delta("", (), (), "length" if self.finished else None)
        self.completion_tokens += len(out.token_ids)
        final = out.finish_reason is not None
        new_text = self.detokenizer.push(out.token_ids) if out.token_ids else ""
        if final:
            new_text += self.detokenizer.finish()
        text = self.stops.push(new_text)
        hit = self.stops.stopped
        if final and not hit:
            text += self.stops.flush()
        if hit and self.include_stop_str:
            text += self.stops.matched or ""
        finish = "stop" if hit else out.finish_reason
        self.finished = finish is not None
        self.stopped_by_string = hit
        if hit:
            self.stop_reason = self.stops.matched
        elif finish == "stop" and out.token_ids and out.token_ids[-1] in self.stop_token_ids:
            self.stop_reason = out.token_ids[-1]
        return Delta(text, out.token_ids, out.logprobs or (), finish)


# --- logprobs ------------------------------------------------------------------------------------


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class CompletionLogprobs:
    """Builds the completions ``logprobs`` object (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``); ``text_offset`` runs on across streamed chunks."""

    tokenizer: Tokenizer
    offset: int = 0
    _strings: dict[int, str] = field(default_factory=dict)

    def _s(self, tid: int) -> str:
        if tid not in self._strings:
            self._strings[tid] = token_text(self.tokenizer, tid)
        return self._strings[tid]

    def format(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tid, lp in zip(token_ids, entries):
            s = self._s(tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp.logprob if lp is not None else None)
            out["top_logprobs"].append({self._s(t): v for t, v in lp.top} if lp is not None else None)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def chat_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob], top_n: int) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""

    def item(tid: int, logprob: float) -> dict[str, Any]:
        s = token_text(tokenizer, tid)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}

    content = []
    for lp in entries:
        entry = item(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [item(t, v) for t, v in lp.top[:top_n]]
        content.append(entry)
    return {"content": content}
