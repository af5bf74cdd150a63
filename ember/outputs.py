"""What callers get back (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None     # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class Logprobs:
    """What the sampler found for one sampled token: its logprob and rank, and the top-k
    alternatives, as ids (Logprob entries, with text, are made from it)."""
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class SequenceDelta(NamedTuple):
    """One sequence's token from one step, and how the sequence stands after it."""
    index: int
    token_id: int
    logprobs: Logprobs | None
    finish_reason: str | None
    stop_reason: int | str | None
    stopped_by_token: bool


@dataclass
class RequestDelta:
    """What one engine step added to a request, without text: the engine process sends these,
    and the front end detokenizes (ember/engine/output_processor.py, RemoteRequest)."""
    request_id: str
    finished: bool
    num_cached_tokens: int
    seqs: list[SequenceDelta]
