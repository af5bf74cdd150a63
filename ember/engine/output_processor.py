"""Per-request output state: detokenization, stop strings, logprobs, n > 1 aggregation."""
from __future__ import annotations

from dataclasses import dataclass, field

from ember.core.request import Request
from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.runner.model_runner import Logprobs
from ember.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class SequenceState:
    request: Request
    index: int
    detok: IncrementalDetokenizer
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
        req, sp = self.request, self.request.sampling_params
        if lp is not None:
            strings = tok.token_strings([lp.token_id] + [t for t, _ in lp.top])
            # the chosen token first, with its own rank even when it is also among the top-k
            entry = {lp.token_id: Logprob(lp.logprob, lp.rank, strings[0])}
            for rank, ((t, v), s) in enumerate(zip(lp.top, strings[1:]), 1):
                entry.setdefault(t, Logprob(v, rank, s))
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(entry)
            self.cumulative_logprob = (self.cumulative_logprob or 0.0) + lp.logprob
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

