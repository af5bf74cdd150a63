"""POST /v1/completions: one engine request per prompt; choice index = prompt * n + sample."""
from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from ember.outputs import CompletionOutput, Logprob, RequestOutput
from ember.server.protocol import CompletionRequest
from ember.server.serving_common import APIError, ServingContext, clamp, final_usage, sse_events


def completion_logprobs(entries: list[dict[int, Logprob]], token_ids: list[int],
                        offset: int) -> dict:
    """Legacy completions format; text_offset counts from `offset` in the returned text."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tid, entry in zip(token_ids, entries):
        chosen = entry[tid]
        tokens.append(chosen.decoded_token)
        token_logprobs.append(clamp(chosen.logprob))
        ranked = sorted(entry.values(), key=lambda lp: lp.rank or 0)
        top.append({lp.decoded_token: clamp(lp.logprob) for lp in ranked})
        offsets.append(offset)
        offset += len(chosen.decoded_token or "")
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


@dataclass
class _Prompt:
    text: str          # what echo prints
    ids: list[int]


@dataclass
class _ChoiceProgress:
    """What a streamed choice has sent so far."""
    text: int = 0
    tokens: int = 0
    offset: int = 0
    started: bool = False
    finished: bool = False


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        ctx = self.ctx
        ctx.check_model(req.model)
        ctx.check_num_seqs(len(req.prompts()) * req.n)       # before tokenizing them all
        try:
            sp = req.sampling_params(req.max_tokens, req.logprobs)
            prompts = [self._tokenize(p, req.echo, sp.skip_special_tokens) for p in req.prompts()]
        except ValueError as e:
            raise APIError.bad_request(e) from None
        base = ctx.new_id("cmpl")
        rids = [f"{base}-{i}" for i in range(len(prompts))]
        stream = await ctx.start([(rid, p.ids, ctx.params_for(sp, len(p.ids), req.max_tokens))
                                  for rid, p in zip(rids, prompts)])
        meta = ctx.response_meta(base, "text_completion", req.model)
        timer = ctx.metrics.timer()
        if req.stream:
            chunks = self._stream(req, meta, rids, prompts, stream, timer)
            return StreamingResponse(sse_events(chunks), media_type="text/event-stream")
        finals = await ctx.collect(raw, stream, timer)
        if finals is None:
            return Response(status_code=499)      # the client is gone; nobody reads this
        choices = []
        for pi, (rid, prompt) in enumerate(zip(rids, prompts)):
            for c in finals[rid].outputs:
                choices.append(self._choice(req, pi * req.n + c.index, prompt, c))
        return JSONResponse({**meta, "choices": choices,
                             "usage": final_usage([len(p.ids) for p in prompts], finals)})

    def _tokenize(self, prompt: str | list[int], echo: bool, skip_special: bool) -> _Prompt:
        text, ids = self.ctx.engine.tokenize_prompt(prompt)
        if text is None:                     # token ids: echo shows their text
            text = self.ctx.tokenizer.decode(ids, skip_special) if echo else ""
        return _Prompt(text, ids)

    @staticmethod
    def _choice(req: CompletionRequest, index: int, prompt: _Prompt, c: CompletionOutput) -> dict:
        head = prompt.text if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs(c.logprobs or [], c.token_ids, len(head))
        return {"index": index, "text": head + c.text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    async def _stream(self, req: CompletionRequest, meta: dict, rids: list[str],
                      prompts: list[_Prompt], stream: AsyncIterator[RequestOutput],
                      timer) -> AsyncIterator[dict]:
        prompt_of = {rid: i for i, rid in enumerate(rids)}
        progress: dict[int, _ChoiceProgress] = {}
        finals: dict[str, RequestOutput] = {}
        try:
            async for out in stream:
                timer.on_output(out)
                finals[out.request_id] = out
                pi = prompt_of[out.request_id]
                for c in out.outputs:
                    index = pi * req.n + c.index
                    choice = self._delta(req, index, prompts[pi],
                                         progress.setdefault(index, _ChoiceProgress()), c)
                    if choice is not None:
                        yield {**meta, "choices": [choice], "usage": None}
        finally:
            await stream.aclose()
        if req.include_usage:
            yield {**meta, "choices": [], "usage": final_usage([len(p.ids) for p in prompts],
                                                                finals)}

    @staticmethod
    def _delta(req: CompletionRequest, index: int, prompt: _Prompt, done: _ChoiceProgress,
               c: CompletionOutput) -> dict | None:
        if done.finished:            # n > 1: later outputs still carry this finished choice
            return None
        text = c.text[done.text:]
        new_ids = c.token_ids[done.tokens:]
        if not done.started and req.echo:
            text = prompt.text + text
            done.offset = len(prompt.text)
        if not (text or new_ids or c.finished):
            return None
        # A token without text (a special token, half a character, text held back while a stop
        # string may be starting) still gets its chunk: clients count tokens by chunks.
        logprobs = None
        if req.logprobs is not None:
            logprobs = completion_logprobs((c.logprobs or [])[done.tokens:], new_ids, done.offset)
            if logprobs["tokens"]:
                done.offset = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1] or "")
        done.text, done.tokens, done.started = len(c.text), len(c.token_ids), True
        done.finished = c.finished
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
