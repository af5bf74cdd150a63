"""The server's overhead: loadgen W1/W2 against `ember serve`, and the same workloads through the
engine offline (no HTTP), in one run, on the default model.

W1 = 64 requests × 128 prompt tokens × 128 output tokens, all at once; W2 = 8 one at a time.
Prompts are loadgen's (same tokenizer, same seeds) in both modes; every run has its own seed.

    python benchmarks/serving.py [--shared ../shared]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOADS = {"W1": dict(n=64, c=0, seed=11), "W2": dict(n=8, c=1, seed=21)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    sys.exit("server did not become ready")


def run_server(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ember.cli", "serve", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        wait_ready(url, proc)
        for name, w in WORKLOADS.items():
            cmd = [sys.executable, args.loadgen, "--base-url", url, "--tokenizer", args.tokenizer,
                   "-n", str(w["n"]), "-c", str(w["c"]), "-i", "128", "-o", "128",
                   "--seed", str(w["seed"])]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        proc.terminate()
        proc.wait(30)
    return results


def pct(values, p):
    v = sorted(values)
    k = (len(v) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def run_offline(args, loadgen) -> dict:
    from ember import SamplingParams
    from ember.engine.llm_engine import LLMEngine
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    results = {}
    for name, w in WORKLOADS.items():
        engine = LLMEngine()
        prompts = [ids for _, ids in loadgen.build_prompts(args.tokenizer, w["n"], 128, w["seed"])]
        engine.add_request({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8))
        while engine.has_unfinished_requests():
            engine.step()                                  # warm-up, as loadgen does
        batches = [prompts] if w["c"] == 0 else [[p] for p in prompts]
        ttft, itl, tokens = [], [], 0
        t0 = time.perf_counter()
        for batch in batches:
            start = time.perf_counter()
            for p in batch:
                engine.add_request({"prompt_token_ids": p}, sp)
            last: dict[str, float] = {}
            while engine.has_unfinished_requests():
                for out in engine.step():
                    now = time.perf_counter()
                    if out.request_id in last:
                        itl.append(now - last[out.request_id])
                    else:
                        ttft.append(now - start)
                    last[out.request_id] = now
                    if out.finished:
                        tokens += len(out.outputs[0].token_ids)
        wall = time.perf_counter() - t0
        results[name] = {"output_tok_per_s": tokens / wall,
                         "ttft_ms_p50": 1e3 * pct(ttft, 50), "ttft_ms_p99": 1e3 * pct(ttft, 99),
                         "itl_ms_p50": 1e3 * pct(itl, 50), "itl_ms_p99": 1e3 * pct(itl, 99)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=os.path.join(HERE, "..", "..", "shared"))
    args = ap.parse_args()
    args.loadgen = os.path.join(args.shared, "loadgen.py")
    args.tokenizer = os.path.join(args.shared, "models", "smollm2-135m-instruct-tokenizer")
    spec = importlib.util.spec_from_file_location("loadgen", args.loadgen)
    loadgen = importlib.util.module_from_spec(spec)
    sys.modules["loadgen"] = loadgen              # its dataclasses look their module up
    spec.loader.exec_module(loadgen)
    server = run_server(args)
    offline = run_offline(args, loadgen)
    keys = ["output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99"]
    print(f"{'run':<16}" + "".join(f"{k:>18}" for k in keys))
    for name in WORKLOADS:
        for mode, res in (("server", server), ("offline", offline)):
            print(f"{name + ' ' + mode:<16}" + "".join(f"{res[name][k]:>18.1f}" for k in keys))
        ratio = server[name]["output_tok_per_s"] / offline[name]["output_tok_per_s"]
        print(f"{name} server/offline output tok/s: {ratio:.2f}")
    print(json.dumps({"server": server, "offline": offline}))


if __name__ == "__main__":
    main()
