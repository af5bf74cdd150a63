"""A request as the control plane sees it: token ids, progress, and how it ended."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ember.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    parent: Request | None = None          # n > 1: siblings fork the parent's prompt KV
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0             # tokens whose KV is in the cache
    num_cached_tokens: int = 0               # prompt tokens reused from other requests' KV
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    stopped_by_token: bool = False           # ended by EOS or a stop_token_id (its text is dropped)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> RequestStatus | None:
        """Called after each sampled token: the status this request should end with, if any."""
        sp, last = self.sampling_params, self.output_token_ids[-1]
        if self.num_output_tokens >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.stopped_by_token = True
                return RequestStatus.FINISHED_STOPPED
            if last in sp.stop_token_ids:
                self.stop_reason, self.stopped_by_token = last, True
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and self.num_output_tokens >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
