"""Deltas -> OpenAI response bodies, for completions and chat, streamed or not.

Both formatters build a non-streamed response from the *same* deltas a stream would send (text
concatenated), so streamed chunks always concatenate to the non-streamed text. A response with several
choices (several prompts, ``n`` copies) has one formatter per choice, all with the response's id and
``created``; each formatter writes its choice's ``index`` and ``stop_reason`` (see
:mod:`splitserve.router.choices`, which merges them and sums the usage). A chat choice with tools passes its text
through a :class:`~splitserve.router.tools.ToolCallStream` (router/tools.py): content and ``tool_calls`` deltas,
``finish_reason`` ``"tool_calls"`` when the model called tools.

``return_token_ids`` (vLLM's layout): every choice, and every streamed chunk's choice, carries ``token_ids``, the ids
generated (in that chunk), from the same deltas, so streamed ids concatenate to the non-streamed ones; an echoed prompt
is not among them, and an echo-only choice has none. The prompt's ids, ``prompt_token_ids``, are on each choice for
completions (streamed: on the choice's first chunk) and at the top level for chat (streamed: on the role chunks).
Without it the bodies have neither key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from splitserve.core.messages import TokenLogprob
from splitserve.core.tokenizer import Tokenizer
from splitserve.router.openai_api import ChatCompletionRequest, CompletionRequest, new_id, usage
from splitserve.router.output import CompletionLogprobs, Delta, OutputProcessor, chat_logprobs
from splitserve.router.tools import ToolCallStream, whole_message


@dataclass(frozen=True)
class ResponseHead:
    """The id and creation time every choice of one response shares."""

    id: str
    created: int

    @classmethod
    def new(cls, id_prefix: str) -> ResponseHead:
        return cls(new_id(id_prefix), int(time.time()))


class Formatter:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, tokenizer: Tokenizer, model: str, head: ResponseHead, index: int = 0,
                 prompt_ids: Sequence[int] = (), return_token_ids: bool = False) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.id = head.id
        self.created = head.created
        self.index = index
        self.prompt_ids = list(prompt_ids)
        """The token ids of this choice's prompt."""
        self.return_token_ids = return_token_ids
        """The request asked for ``token_ids`` / ``prompt_token_ids``."""

    def body(self, choice: dict[str, Any] | None, chunk: bool, usage_: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object_name if chunk else self.object_name,
                "created": self.created, "model": self.model, "choices": [choice] if choice else [],
                "usage": usage_}

    def usage_chunk(self, usage_: dict[str, Any]) -> dict[str, Any]:
        return self.body(None, True, usage_)

    @staticmethod
    def usage(proc: OutputProcessor) -> dict[str, Any]:
        return usage(proc.num_prompt_tokens, proc.completion_tokens, proc.num_cached_tokens)

    @staticmethod
    def stop_reason(finish: str | None, proc: OutputProcessor) -> str | int | None:
        return proc.stop_reason if finish is not None else None

    def start_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, delta: Delta, proc: OutputProcessor) -> dict[str, Any] | None:
        raise NotImplementedError

    def full(self, deltas: Sequence[Delta], proc: OutputProcessor) -> dict[str, Any]:
        raise NotImplementedError


class CompletionFormatter(Formatter):
    """``text_completion`` bodies; echo prepends the prompt (and its logprobs) to the first output."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, tokenizer: Tokenizer, model: str, head: ResponseHead, index: int, req: CompletionRequest,
                 prompt: str | Sequence[int], prompt_ids: Sequence[int]) -> None:
        super().__init__(tokenizer, model, head, index, prompt_ids, req.return_token_ids)
        self.prompt = prompt
        self._prompt_ids_pending = req.return_token_ids
        """Streamed: the choice's first chunk still has to carry ``prompt_token_ids``."""
        self._echo_pending = req.echo
        self._logprobs = CompletionLogprobs(tokenizer) if req.logprobs is not None else None

    def _prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.tokenizer.decode(self.prompt_ids)

    def _piece(self, deltas: Sequence[Delta], proc: OutputProcessor) -> tuple[str, dict[str, Any] | None]:
        """Text and logprobs of ``deltas``, with the echoed prompt first if it is still pending."""
        text = "".join(d.text for d in deltas)
        ids: list[int] = [t for d in deltas for t in d.token_ids]
        entries: list[TokenLogprob | None] = [e for d in deltas for e in d.logprobs]
        if self._echo_pending:
            self._echo_pending = False
            text = self._prompt_text() + text
            prompt_lps = list(proc.prompt_logprobs or [None] * len(self.prompt_ids))
            ids, entries = self.prompt_ids + ids, prompt_lps + entries
        if self._logprobs is None:
            return text, None
        return text, self._logprobs.format(ids, entries)

    def _choice(self, text: str, logprobs: dict[str, Any] | None, finish: str | None, proc: OutputProcessor,
                deltas: Sequence[Delta]) -> dict[str, Any]:
        choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish,
                  "stop_reason": self.stop_reason(finish, proc)}
        if self.return_token_ids:
            choice["token_ids"] = [t for d in deltas for t in d.token_ids]
            if self._prompt_ids_pending:
                choice["prompt_token_ids"] = list(self.prompt_ids)
                self._prompt_ids_pending = False
        return choice

    def chunk(self, delta: Delta, proc: OutputProcessor) -> dict[str, Any] | None:
        text, logprobs = self._piece([delta], proc)
        if not text and not delta.finish_reason and not delta.token_ids:
            return None
        return self.body(self._choice(text, logprobs, delta.finish_reason, proc, [delta]), True, None)

    def full(self, deltas: Sequence[Delta], proc: OutputProcessor) -> dict[str, Any]:
        text, logprobs = self._piece(deltas, proc)
        finish = deltas[-1].finish_reason if deltas else None
        return self.body(self._choice(text, logprobs, finish, proc, deltas), False, self.usage(proc))


class ChatFormatter(Formatter):
    """``chat.completion`` / ``chat.completion.chunk`` bodies; the first chunk carries the role."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, tokenizer: Tokenizer, model: str, head: ResponseHead, index: int,
                 req: ChatCompletionRequest, prompt_ids: Sequence[int], tool_parser: str | None = None) -> None:
        super().__init__(tokenizer, model, head, index, prompt_ids, req.return_token_ids)
        self.top_n = (req.top_logprobs or 0) if req.logprobs else None
        self.req, self.tool_parser = req, tool_parser
        self.tools = ToolCallStream.for_request(req, tool_parser)
        """Tool calls of this choice (None: no tools, or ``tool_choice="none"``)."""

    def _logprobs(self, deltas: Sequence[Delta]) -> dict[str, Any] | None:
        if self.top_n is None:
            return None
        return chat_logprobs(self.tokenizer, [e for d in deltas for e in d.logprobs], self.top_n)

    def _with_prompt_ids(self, body: dict[str, Any]) -> dict[str, Any]:
        """Chat puts ``prompt_token_ids`` at the top level of the response (vLLM's layout)."""
        if self.return_token_ids:
            body["prompt_token_ids"] = list(self.prompt_ids)
        return body

    def start_chunks(self) -> list[dict[str, Any]]:
        choice = {"index": self.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [self._with_prompt_ids(self.body(choice, True, None))]

    def _split(self, delta: Delta) -> tuple[str, list[dict[str, Any]], str | None]:
        """(content, tool-call deltas, finish reason) of one delta."""
        if self.tools is None:
            return delta.text, [], delta.finish_reason
        content, calls = self.tools.push(delta.text)
        if delta.finish_reason is not None:
            more, more_calls = self.tools.finish()
            content, calls = content + more, calls + more_calls
        return content, calls, self.tools.finish_reason(delta.finish_reason)

    def chunk(self, delta: Delta, proc: OutputProcessor) -> dict[str, Any] | None:
        content, calls, finish = self._split(delta)
        if not content and not calls and not finish and not delta.token_ids:
            return None
        body: dict[str, Any] = {"content": content} if content else {}
        if calls:
            body["tool_calls"] = calls
        choice = {"index": self.index, "delta": body, "logprobs": self._logprobs([delta]), "finish_reason": finish,
                  "stop_reason": self.stop_reason(finish, proc)}
        if self.return_token_ids:
            choice["token_ids"] = list(delta.token_ids)
        return self.body(choice, True, None)

    def full(self, deltas: Sequence[Delta], proc: OutputProcessor) -> dict[str, Any]:
        finish = deltas[-1].finish_reason if deltas else None
        message: dict[str, Any] = {"role": "assistant", "content": "".join(d.text for d in deltas)}
        tools = ToolCallStream.for_request(self.req, self.tool_parser)
        if tools is not None:
            message["content"], calls = whole_message(tools, message["content"])
            if calls:
                message["tool_calls"] = calls
            finish = tools.finish_reason(finish)
        choice = {"index": self.index, "message": message, "logprobs": self._logprobs(deltas), "finish_reason": finish,
                  "stop_reason": self.stop_reason(finish, proc)}
        if self.return_token_ids:
            choice["token_ids"] = [t for d in deltas for t in d.token_ids]
        return self._with_prompt_ids(self.body(choice, False, self.usage(proc)))
