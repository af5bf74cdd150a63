"""Weight-only int8 vs bf16 on the default model: what it costs in quality, what it buys in speed.

Quality, teacher-forced: 16 prompts are continued greedily for 48 tokens in bf16; then at every
position of those texts both engines give their next-token distribution (top 20 logprobs, one
token generated per prefix). Reported: how often the argmax agrees, the mean |Δ logprob| of the
bf16 argmax token, and its mean logprob under each (a perplexity-like figure).
Speed: batch-1 decode ms/token and a 64-sequence batch's output tokens/s, both engines in this run.

    python benchmarks/quantization.py
"""
from __future__ import annotations

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
    results = {}
    prefixes = None
    for quant in (None, "int8"):
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
    ref, test = results[None][0], results["int8"][0]
    agree = sum(max(a, key=a.get) == max(b, key=b.get) for a, b in zip(ref, test)) / len(ref)
    deltas, lp_ref, lp_test = [], [], []
    for a, b in zip(ref, test):
        top = max(a, key=a.get)
        if top in b:
            deltas.append(abs(a[top] - b[top]))
            lp_ref.append(a[top])
            lp_test.append(b[top])
    print(f"positions scored: {len(ref)} ({len(PROMPTS)} prompts x {CONTINUATION})")
    print(f"argmax agreement int8 vs bf16: {agree:.1%}")
    print(f"mean |d logprob| of the bf16 argmax token: {statistics.mean(deltas):.4f} "
          f"(p99 {sorted(deltas)[int(0.99 * len(deltas))]:.4f}; {len(deltas)} positions where "
          f"int8's top 20 holds it)")
    print(f"mean logprob of the bf16 argmax token: bf16 {statistics.mean(lp_ref):.4f}, "
          f"int8 {statistics.mean(lp_test):.4f}")
    for name, key in (("bf16", None), ("int8", "int8")):
        _, itl, tps = results[key]
        print(f"{name}: batch-1 decode {itl:.2f} ms/token, 64 x 128 tokens {tps:.0f} tok/s")
    print(f"int8 / bf16: batch-1 {results[None][1] / results['int8'][1]:.2f}x faster, "
          f"batch-64 {results['int8'][2] / results[None][2]:.2f}x")


if __name__ == "__main__":
    main()
