"""POST /v1/chat/completions: the model's chat template, then one engine request with n samples."""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.server.protocol import ChatCompletionRequest, ChatMessage
from ember.server.serving_common import (APIError, ServingContext, clamp, final_usage,
                                         sse_events)


def _token_info(lp: Logprob) -> dict:
    token = lp.decoded_token or ""
    return {"token": token, "logprob": clamp(lp.logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int], top_k: int) -> dict:
    """Chat format: per token, its own entry and the top_k most likely tokens by rank."""
    content = []
    for tid, entry in zip(token_ids, entries):
        top = sorted((lp for lp in entry.values() if lp.rank is not None and lp.rank <= top_k),
                     key=lambda lp: lp.rank)
        content.append({**_token_info(entry[tid]), "top_logprobs": [_token_info(lp) for lp in top]})
    return {"content": content}


def render_messages(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool
                    ) -> list[int]:
    try:
        return tokenizer.apply_chat_template([m.as_template_input() for m in messages],
                                             add_generation_prompt)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 — a template that rejects the conversation (jinja error)
        raise ValueError(f"messages could not be rendered with the chat template: {e}") from None


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        if not ctx.tokenizer.hf_loaded:     # the first chat: transformers loads off the loop
            await asyncio.to_thread(lambda: ctx.tokenizer.hf)
        try:
            sp = req.sampling_params(req.max_new_tokens, req.num_logprobs)
            ids = render_messages(ctx.tokenizer, req.messages, req.add_generation_prompt)
        except ValueError as e:
            raise APIError.bad_request(e) from None
        rid = ctx.new_id("chatcmpl")
        stream = await ctx.start([(rid, ids, ctx.params_for(sp, len(ids), req.max_new_tokens))])
        timer = ctx.metrics.timer()
        if req.stream:
            meta = ctx.response_meta(rid, "chat.completion.chunk", req.model)
            chunks = self._stream(req, meta, len(ids), stream, timer)
            return StreamingResponse(sse_events(chunks), media_type="text/event-stream")
        finals = await ctx.collect(raw, stream, timer)
        if finals is None:
            return Response(status_code=499)      # the client is gone; nobody reads this
        meta = ctx.response_meta(rid, "chat.completion", req.model)
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(req, c, 0), "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for c in finals[rid].outputs]
        return JSONResponse({**meta, "choices": choices, "usage": final_usage([len(ids)], finals)})

    @staticmethod
    def _logprobs(req: ChatCompletionRequest, c: CompletionOutput, start: int) -> dict | None:
        if not req.logprobs:
            return None
        return chat_logprobs((c.logprobs or [])[start:], c.token_ids[start:], req.top_logprobs or 0)

    async def _stream(self, req: ChatCompletionRequest, meta: dict, prompt_len: int,
                      stream: AsyncIterator[RequestOutput], timer) -> AsyncIterator[dict]:
        def chunk(index: int, delta: dict, logprobs=None, finish=None, stop=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs,
                      "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop
            return {**meta, "choices": [choice], "usage": None}

        # The role comes first, before any token: clients key the message off it.
        for i in range(req.n):
            yield chunk(i, {"role": "assistant", "content": ""})
        sent_text, sent_tokens, ended = [0] * req.n, [0] * req.n, [False] * req.n
        final: RequestOutput | None = None
        try:
            async for out in stream:
                timer.on_output(out)
                final = out
                for c in out.outputs:
                    i = c.index
                    text = c.text[sent_text[i]:]
                    new_tokens = len(c.token_ids) > sent_tokens[i]
                    if ended[i] or not (text or new_tokens or c.finished):
                        continue             # as in completions: one chunk per new token(s)
                    logprobs = self._logprobs(req, c, sent_tokens[i])
                    sent_text[i], sent_tokens[i] = len(c.text), len(c.token_ids)
                    ended[i] = c.finished
                    yield chunk(i, {"content": text} if text else {}, logprobs,
                                c.finish_reason, c.stop_reason)
        finally:
            await stream.aclose()
        if req.include_usage and final is not None:
            yield {**meta, "choices": [], "usage": final_usage([prompt_len],
                                                                {final.request_id: final})}
