"""The only place that names a device API. Everything goes through torch.accelerator, CPU fallback."""
from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import platform
import time

import psutil
import torch


def default_device() -> torch.device:
    if torch.accelerator.is_available():
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type, torch.accelerator.current_device_index())
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def multiprocessor_count(device: torch.device) -> int:
    """Parallel compute units of the device (the CPU's cores on the CPU): sizes kernel grids."""
    if device.type == "cuda":
        from ember.platforms import cuda
        return cuda.multiprocessor_count(device)
    return os.cpu_count() or 1


def graphs_supported(device: torch.device) -> bool:
    """Whether decode steps can be captured into device graphs and replayed."""
    return device.type == "cuda"


def graph_pool(device: torch.device):
    from ember.platforms import cuda
    return cuda.graph_pool()


def capture_graph(device: torch.device, fn, pool):
    """(graph, outputs) for fn() captured on `device`; graph.replay() reruns it in place."""
    from ember.platforms import cuda
    return cuda.capture(fn, pool)


def available_memory(device: torch.device) -> int:
    """Bytes free for the KV cache on this device right now."""
    if device.type == "cpu":
        return psutil.virtual_memory().available
    free, _total = torch.accelerator.get_memory_info(device)
    return free


@functools.cache
def _openmp_pause():
    """omp_pause_resource_all of the OpenMP runtime torch loaded (libgomp, libomp, libiomp), or
    None where there is none or it lacks OpenMP 5.0's pause API."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "omp" in line.rsplit("/", 1)[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        if not os.path.isfile(path):
            continue
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all   # already loaded: same handle
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release_host_threads() -> None:
    """Give back the calling thread's OpenMP worker threads (they are made again if it runs
    parallel CPU work later).

    Every thread that runs a parallel torch op or CPU kernel gets its own OpenMP team, and the
    workers stay. Once a process holds more OpenMP threads than cores, libgomp stops spinning
    between parallel regions and each region pays a futex wake-up instead: on 2 cores a batch-1
    decode step (~220 small regions) took 15 ms instead of 10 when the model was loaded in one
    thread and stepped in another. So a thread that hands its model to the engine thread calls
    this first."""
    pause = _openmp_pause()
    if pause is not None:
        pause(1)                                            # omp_pause_soft


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor. On the CPU it is backed by an anonymous mapping, which the kernel
    zero-fills page by page on first touch: a 4 GiB KV cache costs neither seconds of memset at
    start-up nor resident memory until it is used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=dtype, count=math.prod(shape)).view(shape)


def default_step_tokens(device: torch.device) -> int:
    """The default prefill budget of one engine step (max_num_batched_tokens; decodes ride
    along). On the CPU a step of 1024 tokens already runs the matmuls at full speed, and smaller
    prefill steps put first tokens out sooner: on W1 (64 prompts of 128 tokens at once,
    benchmarks/peers.py) the median first token came at 3.6-4.2 s over four runs against
    4.1-4.6 s with 2048, at the same throughput (Zen 4, when decodes still took budget)."""
    return 1024 if device.type == "cpu" else 2048


def default_kv_cache_bytes(device: torch.device) -> int:
    free = available_memory(device)
    if device.type == "cpu":
        # Leave most RAM to the OS and other processes: vLLM-CPU's default is 4 GiB.
        return int(min(4 << 30, 0.25 * free))
    return int(0.85 * free)


def _time_matmuls(a32, b32, rounds: int = 7) -> tuple[float, float]:
    """Best time of a bf16 and an fp32 matmul, interleaved so that load on the machine hits both.
    The bf16 one is ember's linear kernel where it serves (the model's linears then run on it,
    not on torch's matmul), else torch's."""
    from ember import kernels
    a16, w16 = a32.bfloat16(), b32.t().contiguous().bfloat16()      # w: [N, K], as a linear's
    packed = kernels.pack_linear_weight(w16)
    bf16_matmul = lambda: kernels.linear(a16, w16, None, packed)   # noqa: E731 (torch's if None)
    fp32_matmul = lambda: a32 @ b32                                  # noqa: E731
    best = [float("inf"), float("inf")]
    for _ in range(rounds):
        for i, matmul in enumerate((bf16_matmul, fp32_matmul)):
            t = time.perf_counter()
            for _ in range(3):
                matmul()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0], best[1]


def _cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _bf16_is_fast_on_cpu() -> bool:
    """Measured, not guessed from a CPU name: bf16 must beat fp32 on a matmul of model-like shape
    (through ember's kernel where it serves: on CPUs without AVX-512 BF16, where torch's bf16
    matmul is slower than its fp32, ember's kernel still wins by reading half the bytes). The
    verdict is cached on disk per CPU, torch version and kernel availability, so every start
    decides the same."""
    from ember.config import cache_dir
    from ember.kernels import cpu as cpu_kernels
    cpu = _cpu_model()
    kernel = "ember-kernels" if cpu_kernels.has_linear_bf16() else "torch"
    key = f"{cpu}|{torch.__version__}|{torch.backends.cpu.get_cpu_capability()}|{kernel}"
    path = os.path.join(cache_dir(), "bf16_probe.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if key not in known:
        t16, t32 = _time_matmuls(torch.randn(64, 1024), torch.randn(1024, 1024))
        known[key] = t16 < 0.8 * t32
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(known, f)
        except OSError:
            pass
    return bool(known[key])


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cpu":
        return torch.bfloat16 if _bf16_is_fast_on_cpu() else torch.float32
    return torch.bfloat16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return default_dtype(device)
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(names)}")
    return names[dtype]
