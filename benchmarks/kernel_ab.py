"""Variants of ember's CPU kernels side by side: the linears of a whole decode step (or prefill
chunk) of the default model's shapes, through each variant's library, calls alternated.

A VM's speed can move by 15% or more from one minute to the next, more than most kernel changes
are worth. Timing one build, then another, compares two moments, not two kernels. This script
loads every variant into one process (each `kernels.cpp` compiled to its own .so), runs them in
turn, round after round (the order reversed every other round), and reports each one's best
time and the median over rounds of its speedup over the first variant (the baseline) in the
same round.

    python benchmarks/kernel_ab.py BASE.cpp VARIANT.cpp [...] [--rows 64] [--rounds 20]

e.g. the committed kernels against your working copy:

    git show HEAD:ember/kernels/cpu/kernels.cpp > /tmp/head.cpp
    python benchmarks/kernel_ab.py /tmp/head.cpp ember/kernels/cpu/kernels.cpp --rows 64

The weights of all 30 layers are distinct tensors, as in a real step, so at decode (few rows) they
come from memory, not from cache. Threads: torch's (OMP_NUM_THREADS=1 isolates the loop itself).
"""
from __future__ import annotations

import argparse
import ctypes
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ember import kernels  # noqa: E402
from ember.kernels import cpu  # noqa: E402

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64, 30 layers
HIDDEN, INTER, QKV, LAYERS = 576, 1536, 576 + 2 * 192, 30
P, I64 = ctypes.c_void_p, ctypes.c_int64


def build(source: str) -> ctypes.CDLL:
    """The library of one variant, built and cached as ember builds its own."""
    return ctypes.CDLL(cpu._build(shutil.which("g++"), source))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sources", nargs="+", help="kernels.cpp variants; the first is the baseline")
    ap.add_argument("--rows", type=int, default=64, help="tokens in the step (64: W1's decode)")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if cpu.library() is None:
        raise SystemExit("ember's CPU kernels do not build here (they need AVX-512 and g++)")
    libs = [build(s) for s in args.sources]
    torch.manual_seed(0)
    layers = [{name: kernels.pack_linear_weight(torch.randn(n, k, dtype=torch.bfloat16) * 0.05)
               for name, n, k in (("qkv", QKV, HIDDEN), ("o", HIDDEN, HIDDEN),
                                  ("gate_up", 2 * INTER, HIDDEN), ("down", HIDDEN, INTER))}
              for _ in range(LAYERS)]
    m = args.rows
    x = torch.randn(m, INTER, dtype=torch.bfloat16)
    y = torch.empty(m, 2 * INTER, dtype=torch.bfloat16)
    xp, yp = P(x.data_ptr()), P(y.data_ptr())

    def step(lib) -> None:
        for w in layers:
            lib.ember_linear_bf16(xp, I64(HIDDEN), P(w["qkv"].data_ptr()), None, yp, I64(QKV),
                                  I64(m), I64(QKV), I64(HIDDEN))
            lib.ember_linear_bf16(xp, I64(HIDDEN), P(w["o"].data_ptr()), None, yp, I64(HIDDEN),
                                  I64(m), I64(HIDDEN), I64(HIDDEN))
            lib.ember_linear_silu(xp, I64(HIDDEN), P(w["gate_up"].data_ptr()), None, yp,
                                  I64(INTER), I64(m), I64(INTER), I64(HIDDEN))
            lib.ember_linear_bf16(xp, I64(INTER), P(w["down"].data_ptr()), None, yp, I64(HIDDEN),
                                  I64(m), I64(HIDDEN), I64(INTER))

    times = [[] for _ in libs]
    for r in range(args.rounds):
        order = list(enumerate(libs))
        if r % 2:
            order.reverse()                               # neither goes first every time
        for i, lib in order:
            step(lib)                                     # its weights' lines, as a step finds them
            t = time.perf_counter()
            step(lib)
            times[i].append(time.perf_counter() - t)
    flop = 2 * m * LAYERS * HIDDEN * (QKV + HIDDEN + 2 * INTER + INTER)
    print(f"linears of one step, {m} rows, {torch.get_num_threads()} threads, {args.rounds} "
          f"rounds (alternated): best time, and the median of the round-by-round speedups over "
          f"the first")
    for source, ts in zip(args.sources, times):
        b = min(ts)
        ratios = sorted(t0 / t for t0, t in zip(times[0], ts))
        print(f"  {source:50} {b * 1e3:8.2f} ms  {flop / b / 1e9:6.0f} GFLOP/s  "
              f"{min(times[0]) / b:5.3f}x best  {ratios[len(ratios) // 2]:5.3f}x median")


if __name__ == "__main__":
    main()
