"""Text in, text out, in one process: tokenize, run the engine, detokenize, apply stop strings."""

from __future__ import annotations

from typing import Sequence

from splitserve.core.config import EngineConfig
from splitserve.core.engine.engine import LLMEngine
from splitserve.core.messages import SamplingParams
from splitserve.core.tokenizer import IncrementalDetokenizer, StopChecker, load_tokenizer


def generate_text(
    cfg: EngineConfig, prompt: str, params: SamplingParams, stop: Sequence[str] = (), engine: LLMEngine | None = None
) -> dict:
    """Generate for one prompt; returns prompt_token_ids, token_ids, text and finish_reason."""
    tok = load_tokenizer(cfg.model)
    engine = engine or LLMEngine(cfg)
    ids = tok.encode(prompt)
    req = engine.add_request(f"generate-{id(ids)}", ids, params)
    detok = IncrementalDetokenizer(tok, ids)
    checker = StopChecker(list(stop))
    pieces: list[str] = []
    reason = None
    while reason is None and engine.has_unfinished():
        for so in engine.step():
            if so.request_id != req.request_id:
                continue
            pieces.append(checker.push(detok.push(so.new_token_ids)))
            reason = "stop" if checker.stopped else so.finish_reason
            if checker.stopped and so.finish_reason is None:
                engine.abort(so.request_id)
    if not checker.stopped:
        pieces.append(checker.push(detok.finish()) + checker.flush())
    return {
        "prompt_token_ids": ids,
        "token_ids": list(req.output_token_ids),
        "text": "".join(pieces),
        "finish_reason": reason,
    }
