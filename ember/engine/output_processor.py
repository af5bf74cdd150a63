"""Per-request output state: detokenization, stop strings, logprobs, n > 1 aggregation.

In-process, LLMEngine keeps it beside its requests. The engine process (ember serve) sends
RequestDeltas instead, and the front end keeps it (RemoteRequest), so that the engine process
never needs the tokenizer, except to find stop strings for the requests that have them.
Torch-free: the front end imports it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.core.request import Request, RequestStatus
from ember.outputs import (CompletionOutput, Logprob, Logprobs, RequestDelta, RequestOutput,
                           SequenceDelta)
from ember.sampling_params import SamplingParams
from ember.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SequenceState:
    request: Request | SequenceMirror
    index: int
    detok: IncrementalDetokenizer | None      # None: the engine process, no stop strings
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None

    @property
    def _hold_back(self) -> int:
        """Chars kept back while running: they may be the start of a stop string."""
        sp = self.request.sampling_params
        if not sp.stop or sp.include_stop_str_in_output or self.request.status.finished:
            return 0
        return max(len(s) for s in sp.stop) - 1

    def add_token(self, token: int, lp: Logprobs | None, tok: Tokenizer) -> str | None:
        """Append one sampled token; returns the stop string it completed, if any."""
        if lp is not None:
            self.add_logprobs(lp, tok)
        return self.add_text(token)

    def add_logprobs(self, lp: Logprobs, tok: Tokenizer) -> None:
        strings = tok.token_strings([lp.token_id] + [t for t, _ in lp.top])
        # the chosen token first, with its own rank even when it is also among the top-k
        entry = {lp.token_id: Logprob(lp.logprob, lp.rank, strings[0])}
        for rank, ((t, v), s) in enumerate(zip(lp.top, strings[1:]), 1):
            entry.setdefault(t, Logprob(v, rank, s))
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.append(entry)
        self.cumulative_logprob = (self.cumulative_logprob or 0.0) + lp.logprob

    def add_text(self, token: int) -> str | None:
        """The token's text, through the detokenizer; returns the stop string it completed."""
        req, sp = self.request, self.request.sampling_params
        if req.stopped_by_token and not sp.include_stop_str_in_output:
            return None
        delta = self.detok.add(token)
        if not delta or not sp.stop:
            self.text += delta
            return None
        start = max(0, len(self.text) - max(len(s) for s in sp.stop) + 1)
        self.text += delta
        for s in sp.stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[:at + (len(s) if sp.include_stop_str_in_output else 0)]
                return s
        return None

    def output(self) -> CompletionOutput:
        req = self.request
        text = self.text[:len(self.text) - self._hold_back] if self._hold_back else self.text
        return CompletionOutput(self.index, text, list(req.output_token_ids),
                                self.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs),
                                req.finish_reason, req.stop_reason)


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[SequenceState] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.seqs)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [s.output() for s in self.seqs], self.finished,
                             num_cached_tokens=max(s.request.num_cached_tokens for s in self.seqs))


@dataclass
class SequenceMirror:
    """The front end's view of one sequence the engine process runs: what SequenceState reads of
    a Request, kept up to date from the SequenceDeltas."""
    sampling_params: SamplingParams
    status: RequestStatus = RequestStatus.RUNNING
    stop_reason: int | str | None = None
    stopped_by_token: bool = False
    num_cached_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None


class RemoteRequest:
    """A request the engine process runs, as the front end sees it: applies the engine's
    RequestDeltas and gives the cumulative RequestOutputs LLMEngine would have given. The engine
    found any stop string first (with the same tokenizer, on the same tokens): here the search
    finds it again, to cut the text."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.state = RequestState(request_id, prompt, prompt_ids)
        for i in range(params.n):
            sp = params.for_child(i) if params.n > 1 else params
            self.state.seqs.append(SequenceState(SequenceMirror(sp), i, IncrementalDetokenizer(
                tokenizer, prompt_ids, sp.skip_special_tokens)))

    def apply(self, delta: RequestDelta) -> RequestOutput:
        for d in delta.seqs:
            self._apply(self.state.seqs[d.index], d)
        for seq in self.state.seqs:
            seq.request.num_cached_tokens = delta.num_cached_tokens
        return self.state.output()

    def _apply(self, seq: SequenceState, d: SequenceDelta) -> None:
        m = seq.request
        m.output_token_ids.append(d.token_id)
        m.status = RequestStatus(d.finish_reason) if d.finish_reason else RequestStatus.RUNNING
        m.stop_reason, m.stopped_by_token = d.stop_reason, d.stopped_by_token
        seq.add_token(d.token_id, d.logprobs, self.tokenizer)
