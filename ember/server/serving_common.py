"""What the completion and chat handlers share: errors, admission, context-length checks,
starting engine requests, collecting or streaming their outputs, and usage."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from ember.engine.interface import EngineError, EngineStopped
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams
from ember.server.metrics import RequestTimer, ServerMetrics
from ember.server.protocol import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:   # an EngineClient (ember/engine/process.py) serves the same calls
    from ember.engine.async_engine import AsyncLLMEngine

_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
                404: "invalid_request_error", 405: "invalid_request_error",
                413: "invalid_request_error",
                503: "server_error", 500: "server_error"}
# Parameter names that ValueError messages (SamplingParams, the engine, protocol) start with.
_PARAMS = ({f.name for f in dataclasses.fields(SamplingParams)} | set(CompletionRequest.model_fields)
           | set(ChatCompletionRequest.model_fields))
# JSON has no -inf; OpenAI-compatible servers clamp impossible tokens' logprobs to this.
MIN_LOGPROB = -9999.0


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | int | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code, self.headers = code, headers

    @classmethod
    def bad_request(cls, err: Exception) -> "APIError":
        msg = str(err)
        first = msg.split(" ", 1)[0]
        return cls(400, msg, param=first if first in _PARAMS else None)

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def admit(num_waiting: int, max_waiting: int | None) -> bool:
    """Admission control: refuse new work while the waiting queue is full."""
    return max_waiting is None or num_waiting < max_waiting


def sse(obj) -> str:
    # ASCII-only JSON: U+2028, U+0085 and friends would split the event in line-based clients.
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def clamp(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def final_usage(prompt_lens: list[int], finals: dict[str, RequestOutput]) -> dict:
    return usage(sum(prompt_lens),
                 sum(len(c.token_ids) for o in finals.values() for c in o.outputs),
                 sum(o.num_cached_tokens for o in finals.values()))


@dataclass
class ServingContext:
    engine: AsyncLLMEngine
    metrics: ServerMetrics
    model_names: list[str]
    max_waiting: int | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def response_meta(self, request_id: str, obj: str, model: str | None) -> dict:
        return {"id": request_id, "object": obj, "created": int(time.time()),
                "model": model or self.model_names[0]}

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise APIError(404, f"The model `{name}` does not exist.", param="model",
                           code="model_not_found")

    def params_for(self, sp: SamplingParams, prompt_len: int, requested: int | None
                   ) -> SamplingParams:
        """Resolve max_tokens against the context (vLLM: absent means all the room left)."""
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                           f"your request has {prompt_len} input tokens. Please reduce the length "
                           f"of the input messages.", param="messages")
        if requested is None:
            try:
                return dataclasses.replace(sp, max_tokens=limit - prompt_len)
            except ValueError as e:          # e.g. min_tokens beyond the room left
                raise APIError.bad_request(e) from None
        if prompt_len + requested > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, "
                           f"you requested {prompt_len + requested} tokens ({prompt_len} in the "
                           f"messages, {requested} in the completion). Please reduce the length "
                           f"of the messages or completion.", param="max_tokens")
        return sp

    def check_num_seqs(self, num_seqs: int) -> None:
        """One request may not fill more than the whole waiting queue."""
        if self.max_waiting is not None and num_seqs > self.max_waiting:
            raise APIError(400, f"this request asks for {num_seqs} sequences (prompts × n); the "
                           f"server takes at most {self.max_waiting} at once", param="n")

    def check_token_ids(self, sp: SamplingParams) -> None:
        vocab = self.engine.vocab_size
        if any(t >= vocab for t in sp.stop_token_ids):
            raise APIError(400, f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")

    async def start(self, requests: list[tuple[str, list[int], SamplingParams]]
                    ) -> AsyncIterator[RequestOutput]:
        self.check_num_seqs(sum(sp.n for _, _, sp in requests))
        for _, _, sp in requests:
            self.check_token_ids(sp)
        if not self.engine.healthy:
            raise APIError(503, "the engine is not available", headers={"Retry-After": "5"})
        if not admit(self.engine.num_waiting(), self.max_waiting):
            raise APIError(503, f"the server is overloaded: more than {self.max_waiting} requests "
                           "are waiting; retry later", code="server_overloaded",
                           headers={"Retry-After": "1"})
        try:
            return await self.engine.add_requests(
                [(rid, {"prompt_token_ids": ids}, sp) for rid, ids, sp in requests])
        except EngineStopped as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
        except ValueError as e:
            raise APIError.bad_request(e) from None

    async def collect(self, raw: Request, stream: AsyncIterator[RequestOutput],
                      timer: RequestTimer) -> dict[str, RequestOutput] | None:
        """The final output of every request, or None if the client left first (then the
        requests are aborted: cancelling the consumer closes the stream)."""
        async def consume() -> dict[str, RequestOutput]:
            finals = {}
            async for out in stream:
                timer.on_output(out)
                finals[out.request_id] = out
            return finals

        task = asyncio.ensure_future(consume())
        watcher = asyncio.ensure_future(wait_for_disconnect(raw))
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task not in done:
            return None
        try:
            return task.result()
        except EngineStopped as e:
            raise APIError(503, str(e), headers={"Retry-After": "5"}) from None
        except EngineError as e:
            raise APIError(500, str(e)) from None


async def wait_for_disconnect(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


async def sse_events(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """SSE framing; an engine failure mid-stream becomes an error event (headers are sent)."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except EngineError as e:
        yield sse({"error": {"message": str(e), "type": "server_error", "param": None,
                             "code": 500}})
    finally:
        await chunks.aclose()
    yield "data: [DONE]\n\n"
