"""The engine process (ember serve) runs LLMEngine(detokenize=False): its steps give RequestDeltas,
token ids without text, and the front end turns them into RequestOutputs (RemoteRequest). Those
must be the RequestOutputs the in-process engine gives, step for step: text, stop strings cut as
asked, logprobs with their token strings, n > 1, every finish reason.
"""
from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.engine.llm_engine import LLMEngine
from ember.engine.output_processor import RemoteRequest
from ember.outputs import RequestDelta

PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def engines(smollm2):
    """The shared in-process engine, and one like it that gives deltas."""
    reference = smollm2.engine
    cfg = reference.config
    remote = LLMEngine(None, dtype=cfg.dtype, block_size=cfg.cache.block_size,
                       max_num_batched_tokens=cfg.scheduler.max_num_batched_tokens,
                       max_model_len=cfg.scheduler.max_model_len,
                       kv_cache_memory=cfg.cache.kv_cache_memory, detokenize=False)
    return reference, remote


def _run_both(reference, remote, requests):
    """Step both engines in lockstep; each step's outputs, from the reference and rebuilt from
    the deltas."""
    tok = reference.tokenizer
    front = {}
    for rid, prompt, sp in requests:
        reference.add_request(prompt, sp, request_id=rid)
        remote.add_request(prompt, sp, request_id=rid)
        text, ids = reference.tokenize_prompt(prompt)
        front[rid] = RemoteRequest(rid, text, ids, sp, tok)
    steps = []
    while reference.has_unfinished_requests() or remote.has_unfinished_requests():
        want, deltas = reference.step(), remote.step()
        assert all(isinstance(d, RequestDelta) for d in deltas)
        steps.append((want, [front[d.request_id].apply(d) for d in deltas]))
    return steps


def _greedy_text(reference, prompt: str, n: int = 24) -> str:
    out = reference.add_request(prompt, SamplingParams(temperature=0, max_tokens=n))
    final = None
    while reference.has_unfinished_requests():
        final = next((o for o in reference.step() if o.request_id == out), final)
    return final.outputs[0].text


def test_deltas_rebuild_the_in_process_outputs(engines):
    reference, remote = engines
    text = _greedy_text(reference, PROMPTS[0])
    words = text.split()
    assert len(words) >= 4, text
    stop = " " + words[2]                  # a stop string the greedy answer reaches
    requests = [
        ("plain", PROMPTS[1], SamplingParams(temperature=0, max_tokens=20)),
        ("stop", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop])),
        ("stop-kept", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24, stop=[stop],
                                                 include_stop_str_in_output=True)),
        ("logprobs", PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, logprobs=3)),
        ("n2", PROMPTS[1], SamplingParams(n=2, temperature=0.9, seed=7, max_tokens=10,
                                          logprobs=1)),
        ("special", PROMPTS[2], SamplingParams(temperature=0, max_tokens=8,
                                               skip_special_tokens=False)),
    ]
    steps = _run_both(reference, remote, requests)
    finals = {}
    for want, got in steps:
        assert got == want
        finals.update((o.request_id, o) for o in got)
    assert set(finals) == {rid for rid, _, _ in requests}
    assert all(o.finished for o in finals.values())
    cut, kept = finals["stop"].outputs[0], finals["stop-kept"].outputs[0]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    assert kept.text == cut.text + stop and not cut.text.endswith(stop)
    assert len(finals["n2"].outputs) == 2
    assert finals["logprobs"].outputs[0].logprobs[0]        # token strings came through


def test_stop_token_id_and_eos(engines):
    reference, remote = engines
    text_ids = reference.tokenize_prompt(PROMPTS[0] + _greedy_text(reference, PROMPTS[0]))[1]
    stop_id = text_ids[-5]
    requests = [("stop-id", PROMPTS[0], SamplingParams(temperature=0, max_tokens=24,
                                                       stop_token_ids=[stop_id])),
                ("eos", "Say hi.", SamplingParams(temperature=0, max_tokens=200))]
    steps = _run_both(reference, remote, requests)
    for want, got in steps:
        assert got == want
    last = {o.request_id: o for want, _ in steps for o in want}
    assert last["stop-id"].outputs[0].stop_reason == stop_id


def test_without_stop_strings_the_tokenizer_is_never_loaded(smollm2):
    cfg = smollm2.engine.config        # the fixture wrote the tokenizer's cache
    engine = LLMEngine(None, dtype=cfg.dtype, max_model_len=512, kv_cache_memory=1 << 26,
                       detokenize=False)
    engine.add_request([1, 2, 3, 4], SamplingParams(temperature=0, max_tokens=4))
    deltas = []
    while engine.has_unfinished_requests():
        deltas += engine.step()
    assert [len(d.seqs) for d in deltas] == [1, 1, 1, 1] and deltas[-1].finished
    assert engine._tokenizer is None and engine._tokenizer_loading is None
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=2, stop=["zzz"]))
    assert engine._tokenizer is not None     # stop strings need the text
