"""Build, cache and load ember's CPU kernels (kernels.cpp) as a plain shared library.

The library is compiled on first use with the machine's g++ for the machine's own CPU
(-march=native) and cached under ~/.cache/ember/kernels, keyed by the source, the flags, the
compiler and the CPU's feature flags; later starts load it in milliseconds. It is called through
ctypes (which releases the GIL), and its OpenMP threads are torch's: torch loaded libgomp first.

`library()` is None when the kernels cannot serve: no compiler, no AVX-512 on this CPU, a failed
build, or EMBER_CPU_KERNELS=0. Callers then use the torch code, which stays the reference.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

from ember.config import cache_dir, env_str

logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(__file__), "kernels.cpp")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]

# the kernels' `dtype` argument
DTYPE_CODES = {"float32": 0, "bfloat16": 1}

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "ember_has_bf16_dot": ([], _I32),
    "ember_linear_bf16": ([_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64], None),
    "ember_linear_w8": ([_P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64], None),
    "ember_has_w8a8": ([], _I32),
    "ember_linear_w8a8": ([_P, _I64, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64], None),
    "ember_linear_silu": ([_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64], None),
    "ember_rms_norm": ([_I32, _P, _P, _P, _P, _P, _I64, _I64, _F32], None),
    "ember_rotary": ([_I32, _P, _I64, _P, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64], None),
    "ember_silu_mul": ([_I32, _P, _P, _I64, _I64], None),
    "ember_argmax": ([_I32, _P, _I64, _I64, _I64, _P], None),
    "ember_has_greedy_head": ([], _I32),
    "ember_greedy_head_prepare": ([_P, _I64, _I64, _P, _P, _P, _P, _P], None),
    "ember_greedy_head": ([_P, _I64, _I64, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _P], None),
    "ember_kv_write": ([_I64, _P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _I64, _I64],
                       None),
    "ember_decode_layers": ([_P, _I64, _P, _P, _P, _I64, _P, _P, _P, _P, _I64, _P], None),
    "ember_paged_decode": ([_I32, _P, _I64, _P, _P, _I64, _P, _P, _I64, _I64, _I64, _I64,
                            _I64, _I64, _F32, _I64], None),
    "ember_paged_prefill": ([_P, _I64, _P, _P, _I64, _P, _P, _I64, _P, _I64, _I64, _I64, _I64,
                             _I64, _F32], _I32),
}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.strip()
    except OSError:
        pass
    return ""


def _build(compiler: str, source: str = _SOURCE) -> str:
    """The path of the library compiled from `source` (ember's kernels.cpp, or a variant of it:
    benchmarks/kernel_ab.py), cached by content, flags, compiler and CPU."""
    with open(source, "rb") as f:
        text = f.read()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(text + " ".join(_FLAGS + [version, _cpu_flags()]).encode()).hexdigest()
    out_dir = os.path.join(cache_dir(), "kernels")
    path = os.path.join(out_dir, f"ember_cpu-{key[:16]}.so")
    if not os.path.exists(path):
        os.makedirs(out_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([compiler, *_FLAGS, "-o", tmp, source],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed")
            os.replace(tmp, path)          # atomic: concurrent builds never load a partial file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@functools.cache
def library() -> ctypes.CDLL | None:
    if env_str("EMBER_CPU_KERNELS", "1") == "0":
        return None
    if not {"avx512f", "avx512bw"} <= set(_cpu_flags().split()):
        return None
    compiler = shutil.which(env_str("CXX") or "g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler: ember's CPU kernels are off, torch code serves")
        return None
    try:
        import torch  # noqa: F401  (libgomp must be torch's, loaded before ours)
        lib = ctypes.CDLL(_build(compiler))
    except (OSError, RuntimeError) as e:
        logger.warning("ember's CPU kernels did not build (%s); torch code serves", e)
        return None
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def has_linear_bf16() -> bool:
    """Whether ember's bf16 kernels serve (linear, fused decode, pair-layout attention, greedy
    head where the CPU has VNNI): on every CPU where the library builds."""
    return library() is not None


@functools.cache
def has_bf16_dot() -> bool:
    """Whether the bf16 kernels' dot products run in hardware (AVX-512 BF16); without it they
    widen bf16 pairs to fp32 and use FMAs (kernels.cpp, dot())."""
    lib = library()
    return lib is not None and bool(lib.ember_has_bf16_dot())


@functools.cache
def has_w8a8() -> bool:
    """Whether the W8A8 linear (int8 weights and activations, VNNI dot products) serves here."""
    lib = library()
    return lib is not None and bool(lib.ember_has_w8a8())
