"""What the engine shows the code that drives it: its errors, counters and published state, and
the checks a prompt passes before it is queued. Importable without torch, so that the HTTP front
end (ember/engine/process.py) can run them in its own process while the engine process loads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ember.config import env_str
from ember.sampling_params import SamplingParams

log = logging.getLogger("ember")


class EngineError(RuntimeError):
    """The engine failed while serving a request (the request is gone; others may go on)."""


class EngineStopped(EngineError):
    """The engine is shutting down or is unhealthy and takes no new work."""


class InjectedFault(RuntimeError):
    """Raised by the test-only fault injector in place of a real step failure."""


class EngineThreadKilled(BaseException):
    """Test-only: escapes every `except Exception` and ends the engine thread, like a crash."""


class FaultInjector:
    """Parses EMBER_FAULT_INJECT ("step_raise:3,engine_die:10"); called by LLMEngine.step."""
    KINDS = {"step_raise": InjectedFault, "engine_die": EngineThreadKilled}

    def __init__(self, spec: str) -> None:
        self.plan: dict[int, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            kind, _, step = item.partition(":")
            if kind not in self.KINDS or not step.isdigit() or int(step) < 1:
                raise ValueError(f"EMBER_FAULT_INJECT: expected kind:step with kind in "
                                 f"{sorted(self.KINDS)} and step >= 1, got {item!r}")
            self.plan[int(step)] = kind
        self.steps = 0
        self.injected: list[tuple[int, str]] = []

    @classmethod
    def from_env(cls) -> "FaultInjector | None":
        spec = env_str("EMBER_FAULT_INJECT")
        return cls(spec) if spec else None

    def __call__(self) -> None:
        self.steps += 1
        kind = self.plan.pop(self.steps, None)
        if kind is not None:
            self.injected.append((self.steps, kind))
            log.warning("EMBER_FAULT_INJECT: injecting %s at step %d", kind, self.steps)
            raise self.KINDS[kind](f"injected fault {kind} at step {self.steps}")


@dataclass
class EngineStats:
    """Counters the server exports; updated by the engine thread only."""
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_prompt_tokens: int = 0
    finished_requests: int = 0
    preemptions: int = 0
    prompt_tokens_computed: int = 0     # prompt tokens that went through the model (not reused)


@dataclass(frozen=True)
class EngineSnapshot:
    """Engine state for /metrics and admission control, published by the engine thread."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hits: int = 0        # tokens
    prefix_cache_queries: int = 0     # tokens
    step_errors: int = 0
    restarts: int = 0
    tracked_requests: int = 0         # request states the engine holds (0 when idle)
    kv_blocks_total: int = 0
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0         # cached by the prefix cache, unreferenced (evictable)
    stats: EngineStats = field(default_factory=EngineStats)   # a copy of the engine's counters
    version: int = 0                  # counts the publications: the latest has the highest


def tokenize_prompt(encode, vocab_size: int, prompt) -> tuple[str | None, list[int]]:
    """A prompt is text, a list of token ids, or {"prompt": ...} / {"prompt_token_ids": ...};
    encode(text) → ids is called for text only."""
    if isinstance(prompt, dict):
        unknown = set(prompt) - {"prompt", "prompt_token_ids"}
        if unknown:
            raise ValueError(f"unknown prompt field(s): {', '.join(sorted(unknown))}")
        prompt = prompt.get("prompt_token_ids", prompt.get("prompt"))
    if isinstance(prompt, str):
        return prompt, encode(prompt)
    if isinstance(prompt, (list, tuple)) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
        return None, list(prompt)
    raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")


def validate_prompt(prompt_ids: list[int], params: SamplingParams, max_model_len: int) -> None:
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens but the model's context "
                         f"(max_model_len) is {max_model_len}: no room to generate")
