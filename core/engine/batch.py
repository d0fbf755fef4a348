"""The one dataclass the scheduler hands the model runner each step (torch-free), and what comes back."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.core.messages import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class SeqWork:
    """One request's share of a step.

    ``token_ids`` are computed at positions ``start_pos .. start_pos + len(token_ids) - 1``; their K/V go to
    the pages in ``page_table`` (page ``i`` holds positions ``[i * page_size, (i + 1) * page_size)``).
    """

    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    page_table: tuple[int, ...]
    sample: bool
    """Sample a next token after this chunk (the request has caught up with its known tokens)."""
    params: SamplingParams
    prompt_token_ids: tuple[int, ...] = ()
    """For repetition penalties and prompt logprobs; empty when neither reads it (``SamplingParams.reads_history``)."""
    output_token_ids: tuple[int, ...] = ()
    """For penalties, ``min_tokens``, and for seeding: the n-th output token uses the seed mixed with n; empty when
    none of them applies."""
    prompt_logprobs: bool = False
    """Return logprobs for the prompt tokens that this chunk's positions predict."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def slots(self, page_size: int) -> list[int]:
        """KV slot (``page_id * page_size + offset``) of every token of this chunk."""
        return [self.page_table[p // page_size] * page_size + p % page_size
                for p in range(self.start_pos, self.start_pos + len(self.token_ids))]

    def written_pages(self, page_size: int) -> tuple[int, ...]:
        """The pages this chunk writes K/V into (those of positions ``start_pos .. start_pos + num_tokens - 1``)."""
        if not self.token_ids:
            return ()
        return self.page_table[self.start_pos // page_size : (self.start_pos + len(self.token_ids) - 1) // page_size + 1]


@dataclass(frozen=True)
class ScheduledBatch:
    """Everything the runner needs for one step, and nothing else."""

    seqs: tuple[SeqWork, ...]
    page_size: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def shares_pages(self, other: "ScheduledBatch") -> bool:
        """Whether a step of this batch and one of ``other`` could touch one page while either writes it (one reads
        or writes a page the other writes): then the two may not run at once. Requests of both count as sharing."""
        ps = self.page_size
        if {s.request_id for s in self.seqs} & {s.request_id for s in other.seqs}:
            return True
        for mine, theirs in ((self, other), (other, self)):
            written = {p for s in mine.seqs for p in s.written_pages(ps)}
            if any(not written.isdisjoint(s.page_table) for s in theirs.seqs):
                return True
        return False

    def block_tables(self) -> list[list[int]]:
        """Every sequence's page table, padded with page 0 (never read) to the longest."""
        width = max(len(s.page_table) for s in self.seqs)
        return [list(s.page_table) + [0] * (width - len(s.page_table)) for s in self.seqs]


@dataclass(frozen=True)
class SeqResult:
    request_id: str
    token_id: int | None
    """Sampled token (None when the chunk did not sample)."""
    logprob: TokenLogprob | None = None
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    """Logprobs of the prompt tokens predicted by this chunk, in order."""
    error: str | None = None
    """Why this sequence's step failed (the engine fails the request); None when it succeeded."""


@dataclass(frozen=True)
class RunnerOutput:
    results: tuple[SeqResult, ...]


def error_text(stage: str, exc: BaseException, limit: int = 500) -> str:
    """One line for the client and the log: ``"<stage> failed: <Type>: <message>"``, cut to ``limit`` characters."""
    text = f"{stage} failed: {type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
