"""Request bodies of the OpenAI API (the only module that uses pydantic).

Models are strict (no "0.5" → 0.5, no true → 1) and forbid unknown fields: a misspelt or
unsupported parameter is a 400 naming it, as OpenAI does, rather than being silently ignored.
Value ranges are checked once, by SamplingParams; here we only check shapes and types, plus
limits that protect the server rather than describe the model: integers fit in int64 (they become
tensors and generator seeds), floats are finite, and stop conditions are bounded in number and
size (they are checked on the engine thread for every generated token).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError,
                      field_validator)

from ember.sampling_params import SamplingParams


MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 256
Int64 = Annotated[int, Field(ge=-(1 << 63), le=(1 << 63) - 1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    model: str | None = None
    n: Int64 = 1
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                      # accepted for compatibility; unused
    logit_bias: dict[str, float] | None = None   # only an empty one is accepted (see _unsupported)

    @field_validator("stop")
    @classmethod
    def _few_short_stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, "
                             f"got {len(stops)}")
        for s in stops:
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ValueError(f"a stop string may have at most {MAX_STOP_STRING_CHARS} "
                                 f"characters, got {len(s)}")
        return stop

    def _unsupported(self) -> list[str]:
        return ["logit_bias"] if self.logit_bias else []

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError with the offending field's name first."""
        bad = self._unsupported()
        if bad:
            raise ValueError(f"{bad[0]} is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        given = {k: getattr(self, k) for k in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty") if getattr(self, k) is not None}
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, seed=self.seed, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output, **given)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: bool = False
    logprobs: Int64 | None = None
    best_of: Int64 | None = None
    suffix: str | None = None

    def _unsupported(self) -> list[str]:
        bad = super()._unsupported()
        if self.suffix:
            bad.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            bad.append("best_of (other than n)")
        if self.echo and self.logprobs is not None:
            bad.append("echo with logprobs (prompt logprobs are not computed)")
        return bad

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p) or [""]          # [] is an empty prompt, which validation rejects


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for "system"; chat templates know only the latter.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool = True
    response_format: dict[str, Any] | None = None

    def _unsupported(self) -> list[str]:
        bad = super()._unsupported()
        if self.response_format and self.response_format.get("type", "text") != "text":
            bad.append("response_format (other than text)")
        if self.top_logprobs is not None and not self.logprobs:
            bad.append("top_logprobs without logprobs=true")
        return bad

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[StrictInt]


def describe_validation_error(err: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter, from pydantic's error list."""
    errors = err.errors()
    first = errors[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(map(str, first['loc']))}", param
    if sum(1 for e in errors if e["loc"][:1] == first["loc"][:1]) > 1:   # no member of a union fit
        if param == "prompt":
            return ("prompt must be a string, a list of strings, a list of token ids, "
                    "or a list of token-id lists"), param
        return f"invalid type for '{param}'", param
    return f"invalid value for '{'.'.join(map(str, first['loc']))}': {first['msg']}", param
