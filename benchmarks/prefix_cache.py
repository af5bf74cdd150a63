"""Prefix cache on vs off, in one run, on the default model.

A: 64 requests sharing a 1,024-token prefix, each with 32 unique tokens, 64 output tokens, all
   submitted at once.
B: a 4-turn chat of 16 conversations: turn t+1's prompt is turn t's prompt + answer + a new
   user message; each turn's 16 requests are submitted together.
Reports prompt tokens that went through the model, TTFT p50 and total time, cache on vs off.

    python benchmarks/prefix_cache.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ember import SamplingParams
from ember.engine.llm_engine import LLMEngine


def run_batch(engine: LLMEngine, prompts: list[list[int]], sp: SamplingParams):
    """Submit all at once, step to completion; returns (outputs in order, TTFTs)."""
    t0 = time.perf_counter()
    ids = [engine.add_request({"prompt_token_ids": p}, sp) for p in prompts]
    first: dict[str, float] = {}
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            first.setdefault(out.request_id, time.perf_counter() - t0)
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids], [first[i] for i in ids]


def workload_a(engine: LLMEngine, args) -> list[float]:
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(100, 49152, (args.prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(100, 49152, (32,), generator=g).tolist() for _ in range(64)]
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    return run_batch(engine, prompts, sp)[1]


def workload_b(engine: LLMEngine, args) -> list[float]:
    tok = engine.tokenizer
    topics = ["rivers", "volcanoes", "owls", "bread", "chess", "comets", "bees", "glass",
              "trains", "tea", "maps", "clouds", "violins", "salt", "bridges", "kites"]
    convs = [[{"role": "user", "content": f"Tell me something about {t}."}] for t in topics]
    sp = SamplingParams(temperature=0, max_tokens=48)
    ttfts = []
    for turn in range(4):
        prompts = [tok.apply_chat_template(c) for c in convs]
        outs, t = run_batch(engine, prompts, sp)
        ttfts += t
        for c, o in zip(convs, outs):
            c.append({"role": "assistant", "content": o.outputs[0].text})
            c.append({"role": "user", "content": f"Interesting. Say more (part {turn + 2})."})
    return ttfts


def measure(workload, cache: bool, args) -> dict:
    engine = LLMEngine(args.model, enable_prefix_caching=cache)
    engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()                                      # warm-up
    before = engine.stats.prompt_tokens_computed
    t = time.perf_counter()
    ttfts = workload(engine, args)
    total = time.perf_counter() - t
    return {"prefill": engine.stats.prompt_tokens_computed - before, "ttft_p50": statistics.median(ttfts),
            "total": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--prefix-len", type=int, default=1024)
    args = ap.parse_args()
    print(f"{'workload':<34}{'cache':>6}{'prefill tokens':>16}{'TTFT p50 s':>12}{'total s':>10}")
    for name, wl in (("A: 64 x shared 1024-token prefix", workload_a), ("B: 16 chats x 4 turns", workload_b)):
        res = {c: measure(wl, c, args) for c in (False, True)}
        for c in (False, True):
            r = res[c]
            print(f"{name:<34}{'on' if c else 'off':>6}{r['prefill']:>16,}{r['ttft_p50']:>12.2f}{r['total']:>10.1f}")
        off, on = res[False], res[True]
        print(f"{'':<34}{'ratio':>6}{off['prefill'] / max(on['prefill'], 1):>15.1f}x"
              f"{off['ttft_p50'] / on['ttft_p50']:>11.1f}x{off['total'] / on['total']:>9.1f}x")


if __name__ == "__main__":
    main()
