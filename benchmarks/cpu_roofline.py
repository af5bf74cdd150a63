"""How close ember's CPU kernels run to this machine's own ceilings, measured in the same run.

Ceilings, from a tiny C program compiled here (g++ -O2 -march=native -fopenmp) and run on all
cores: the peak of AVX-512 BF16 dot products (vdpbf16ps on 12 independent register accumulators,
no memory traffic; on CPUs without AVX-512 BF16 ember's kernels make each dot product of a pair two
fp32 FMAs, so there the fp32 FMA peak is the bf16 ceiling) and of fp32 FMAs, and the read bandwidth of a 512 MiB buffer (AVX-512 loads,
4 streams per thread). Then ember's bf16 linear kernel at decode and prefill sizes of the default
model, each as a fraction of the matching ceiling: GFLOP/s over the dot-product peak where it is
compute-bound, bytes of weights read per second over the read bandwidth at batch 1.

    python benchmarks/cpu_roofline.py          # needs g++ and AVX-512
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time

import torch

from ember import kernels

PROBE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
static volatile float keep;   /* the sums go here so the loops are not optimised away */
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DECL(i) __m512 a##i = _mm512_set1_ps(i);
#define KEEP __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), \
                              "+v"(a6), "+v"(a7), "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11));
#define SUM(i) sink += _mm512_reduce_add_ps(a##i);
static double bf16(long n) {
#ifndef __AVX512BF16__
    return 0;
#endif
    double t = omp_get_wtime(); float sink = 0;
    #pragma omp parallel reduction(+ : sink)
    { R12(DECL)
#ifdef __AVX512BF16__
      __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), y = x;
      for (long i = 0; i < n; i++) {
#define OP(i) a##i = _mm512_dpbf16_ps(a##i, x, y);
          R12(OP) KEEP
#undef OP
      }
#endif
      R12(SUM) }
    keep = sink;
    return omp_get_wtime() - t;
}
static double fp32(long n) {
    double t = omp_get_wtime(); float sink = 0;
    #pragma omp parallel reduction(+ : sink)
    { R12(DECL)
      __m512 x = _mm512_set1_ps(0.5f), y = _mm512_set1_ps(0.5f);
      for (long i = 0; i < n; i++) {
#define OP(i) a##i = _mm512_fmadd_ps(a##i, x, y);
          R12(OP) KEEP
#undef OP
      }
      R12(SUM) }
    keep = sink;
    return omp_get_wtime() - t;
}
static double readbw(const char* buf, size_t bytes) {
    double t = omp_get_wtime(); float sink = 0;
    #pragma omp parallel reduction(+ : sink)
    { int nt = omp_get_num_threads(), id = omp_get_thread_num();
      size_t share = bytes / nt / 4 / 64 * 64; const char* p = buf + (size_t)id * share * 4;
      __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (size_t i = 0; i < share; i += 64) {
          s0 = _mm512_add_ps(s0, _mm512_load_ps((const float*)(p + i)));
          s1 = _mm512_add_ps(s1, _mm512_load_ps((const float*)(p + share + i)));
          s2 = _mm512_add_ps(s2, _mm512_load_ps((const float*)(p + 2 * share + i)));
          s3 = _mm512_add_ps(s3, _mm512_load_ps((const float*)(p + 3 * share + i)));
      }
      sink += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3))); }
    keep = sink;
    return omp_get_wtime() - t;
}
int main() {
    long n = 20000000; int T = omp_get_max_threads(); size_t bytes = 512ul << 20;
    char* buf = (char*)aligned_alloc(64, bytes);
    for (size_t i = 0; i < bytes; i++) buf[i] = (char)i;
    double b = 1e9, f = 1e9, r = 1e9;
    for (int k = 0; k < 5; k++) {
        double x = bf16(n); if (x < b) b = x;
        x = fp32(n); if (x < f) f = x;
        x = readbw(buf, bytes); if (x < r) r = x;
    }
    printf("%f %f %f\n", b > 0 ? n * 12.0 * 64 * T / b / 1e9 : 0.0, n * 12.0 * 32 * T / f / 1e9, bytes / r / 1e9);
    return 0;
}
"""


def ceilings() -> tuple[float, float, float]:
    """(bf16 dot-product GFLOP/s, fp32 FMA GFLOP/s, read GB/s) of this machine, all cores. Without
    AVX-512 BF16 the bf16 ceiling is the fp32 FMA peak (ember's kernels then widen the pairs)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "probe.c"), os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(PROBE)
        subprocess.run(["g++", "-O2", "-march=native", "-fopenmp", src, "-o", exe], check=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        out = subprocess.run([exe], capture_output=True, text=True, check=True, env=env).stdout
    bf, fp, bw = map(float, out.split())
    return bf or fp, fp, bw


def time_linear(m: int, n: int, k: int, copies: int, reps: int = 5) -> float:
    """Best seconds for one [m, k] x [k, n] bf16 linear through ember's kernel (weights cycled over
    `copies` distinct matrices so that batch-1 runs read them from memory, not cache)."""
    weights = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(copies)]
    packed = [kernels.pack_linear_weight(w) for w in weights]
    x = torch.randn(m, k, dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for w, p in zip(weights, packed):
            kernels.linear(x, w, None, p, None)
        best = min(best, (time.perf_counter() - t) / copies)
    return best


def main() -> None:
    if not kernels.cpu.has_linear_bf16():
        raise SystemExit("ember's bf16 linear kernel is not available here (needs AVX-512, g++)")
    bf, fp, bw = ceilings()
    how = "in hardware" if kernels.cpu.has_bf16_dot() else "as fp32 FMAs (no AVX-512 BF16)"
    print(f"threads {torch.get_num_threads()}: bf16 dot products {how} {bf:.0f} GFLOP/s, fp32 FMA "
          f"{fp:.0f} GFLOP/s, read {bw:.1f} GB/s (ceilings, this run)\n")
    print(f"{'ember linear (default model shapes)':<44} {'achieved':>14} {'of ceiling':>11}")
    # batch 1: bandwidth-bound; the shapes of one layer, then the LM head
    for name, n, k, copies in (("batch 1, gate_up [3072 x 576]", 3072, 576, 60),
                               ("batch 1, down [576 x 1536]", 576, 1536, 120),
                               ("batch 1, LM head [49152 x 576]", 49152, 576, 4)):
        dt = time_linear(1, n, k, copies)
        gbs = n * k * 2 / dt / 1e9
        print(f"{name:<44} {gbs:>9.1f} GB/s {gbs / bw:>10.0%}")
    for name, m, n, k in (("64 rows (decode batch), gate_up", 64, 3072, 576),
                          ("1024 rows (prefill step), gate_up", 1024, 3072, 576),
                          ("1024 rows (prefill step), down", 1024, 576, 1536)):
        dt = time_linear(m, n, k, 4)
        gf = 2 * m * n * k / dt / 1e9
        print(f"{name:<44} {gf:>7.0f} GFLOP/s {gf / bf:>10.0%}")


if __name__ == "__main__":
    main()
