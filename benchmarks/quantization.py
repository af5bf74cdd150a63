"""Weight-only int8 and W8A8 vs bf16 on the default model: what each costs in quality, what it buys
in speed.

Quality, teacher-forced: 16 prompts are continued greedily for 48 tokens in bf16; then at every
position of those texts each engine gives its next-token distribution (top 20 logprobs, one
token generated per prefix). Reported: how often the argmax agrees with bf16's, the mean
|Δ logprob| of the bf16 argmax token, and its mean logprob under each (a perplexity-like figure).
Speed: batch-1 decode ms/token and a 64-sequence batch's output tokens/s, every engine in this run.

    python benchmarks/quantization.py [--quantizations int8,w8a8]
"""
from __future__ import annotations

import argparse
import statistics
import time

from ember import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Water boils at", "def fibonacci(n):",
           "The three primary colors are", "Once upon a time, in a small village,",
           "To make a cup of tea, first", "The largest planet in the solar system",
           "In machine learning, overfitting means", "My favourite book is",
           "The quick brown fox", "import numpy as np\n", "Dear hiring manager,",
           "The French Revolution began in", "A haiku about autumn:",
           "Photosynthesis is the process", "SELECT name FROM users WHERE"]
CONTINUATION = 48


def distributions(llm: LLM, prefixes: list[list[int]]) -> list[dict[int, float]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prefixes],
                        SamplingParams(temperature=0, max_tokens=1, logprobs=20), use_tqdm=False)
    return [{t: lp.logprob for t, lp in o.outputs[0].logprobs[0].items()} for o in outs]


def speed(llm: LLM) -> tuple[float, float]:
    one = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    llm.generate(["Warm up."], SamplingParams(max_tokens=8), use_tqdm=False)
    t = time.perf_counter()
    llm.generate(["Tell me a long story about a dragon."], one, use_tqdm=False)
    itl = (time.perf_counter() - t) / 128 * 1e3
    t = time.perf_counter()
    outs = llm.generate([f"Story number {i}:" for i in range(64)], one, use_tqdm=False)
    tps = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    return itl, tps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantizations", default="int8,w8a8", help="compared with bf16, in order")
    quants = ap.parse_args().quantizations.split(",")
    results = {}
    prefixes = None
    for quant in (None, *quants):
        llm = LLM(dtype="bfloat16", quantization=quant)
        if prefixes is None:
            outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=CONTINUATION,
                                                        ignore_eos=True), use_tqdm=False)
            prefixes = []
            for o in outs:
                ids = list(o.prompt_token_ids) + list(o.outputs[0].token_ids)
                prefixes += [ids[:i] for i in range(len(o.prompt_token_ids), len(ids))]
        results[quant] = (distributions(llm, prefixes), *speed(llm))
        del llm
    ref = results[None][0]
    print(f"positions scored: {len(ref)} ({len(PROMPTS)} prompts x {CONTINUATION})")
    for quant in quants:
        test = results[quant][0]
        agree = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(ref, test)) / len(ref)
        deltas, lp_ref, lp_test = [], [], []
        for a, b in zip(ref, test):
            top = max(a, key=a.get)
            if top in b:
                deltas.append(abs(a[top] - b[top]))
                lp_ref.append(a[top])
                lp_test.append(b[top])
        print(f"{quant}: argmax agreement with bf16 {agree:.1%}; mean |d logprob| of the bf16 "
              f"argmax token {statistics.mean(deltas):.4f} (p99 "
              f"{sorted(deltas)[int(0.99 * len(deltas))]:.4f}; {len(deltas)} positions where "
              f"{quant}'s top 20 holds it); its mean logprob: bf16 {statistics.mean(lp_ref):.4f}, "
              f"{quant} {statistics.mean(lp_test):.4f}")
    for quant in (None, *quants):
        _, itl, tps = results[quant]
        print(f"{quant or 'bf16'}: batch-1 decode {itl:.2f} ms/token ({results[None][1] / itl:.2f}x "
              f"bf16's speed), 64 x 128 tokens {tps:.0f} tok/s ({tps / results[None][2]:.2f}x)")


if __name__ == "__main__":
    main()
