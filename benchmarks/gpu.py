"""ember on a CUDA GPU, in one run: kernel checks, greedy parity with transformers, and the
benchmark table.

    python benchmarks/gpu.py [--unfused] [--profile] [--quick] [--skip-hf] [--out DIR]

1. Kernels: the Triton paged attention (bf16) against the torch backend on the same cache, and the
   decode kernel's time against the torch backend's gather + matmul on a 256 × ~1k-token batch.
2. Parity: tiny random-weight Qwen3 / Llama / Mistral (sliding window) models in fp32, ember with
   the default backend ("auto" → triton) and decode graphs, vs transformers' greedy `generate`:
   tokens identical, logprobs close. Chunked prefill (48-token budget) and 8-token blocks put
   cached context before a chunk's queries.
3. Benchmark on a random-weight model of Qwen3-0.6B's shape in bf16 (saved with save_pretrained
   beside a word-level tokenizer built here; prompts are token ids):
   - nano-vllm's workload: 256 sequences, prompt and output lengths uniform in 100..1024 (random
     token ids, seed 0), ignore_eos, temperature 0.6. ember runs all 256; transformers' `generate`
     runs the first --hf-batch sequences as one left-padded batch generating max(output lengths)
     tokens for every row (only the requested tokens count as useful); ember also runs exactly
     that subset, for a like-for-like ratio.
   - batch-1 decode: ms per output token (128-token prompt, 512 greedy tokens: the time of
     513 tokens minus the time of 1, over 512), ember with decode graphs and eager, transformers;
     and the HBM roofline: weight bytes / bandwidth measured by a device-to-device copy here.
   --unfused runs ember a second time with ember.kernels' rms_norm / rotary / silu_and_mul in
   torch instead of the Triton fusions of ember/kernels/triton_cuda.py; --profile adds a
   per-phase wall-time breakdown of the engine and torch.profiler tables (under --out).
Absolute numbers hold for this GPU only; the ratios are the point.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ember import LLM, SamplingParams  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=40960,
                 rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=4096, max_position_embeddings=512, initializer_range=0.15, bos_token_id=1,
            eos_token_id=2, pad_token_id=2, rms_norm_eps=1e-6)
DEV = torch.device("cuda")


def sync() -> None:
    torch.cuda.synchronize()


def save_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer "t0".."t{V-1}": the loader wants one; the prompts are token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t2").save_pretrained(folder)


def build_model(cfg, folder: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with DEV:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():     # random norms and biases, so that a swapped one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(folder, cfg.vocab_size)
    return model


def use_torch_elementwise() -> None:
    """Send CUDA tensors of ember.kernels' rms_norm / rotary / silu_and_mul to their torch code
    instead of the Triton fusions (ember/kernels/triton_cuda.py): what the fusions are worth."""
    from ember import kernels
    kernels.gpu_kernels = lambda t: None


def free(*objs) -> None:
    del objs
    gc.collect()
    torch.cuda.empty_cache()


# ---- 1. kernels --------------------------------------------------------------------------------

def check_kernels(rows: list) -> None:
    from ember.attention import BatchLayout, get_backend

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs = 16, 8, 128, 16
    seqs = [(int(c), 1) for c in torch.randint(0, 3000, (40,), generator=g)]
    seqs += [(0, 300), (17, 100), (1000, 513), (64, 64)]
    num_blocks = sum(-(-(c + n) // bs) for c, n in seqs) + 10
    table_ids = torch.randperm(num_blocks, generator=g).tolist()
    tables, k_all, v_all = [], [], []
    for c, n in seqs:
        tables.append([table_ids.pop() for _ in range(-(-(c + n) // bs))])
    width = max(map(len, tables))
    qlens = torch.tensor([n for _, n in seqs])
    starts = torch.tensor([c for c, _ in seqs])
    layout = BatchLayout(qlens, starts + qlens,
                         torch.cat([torch.arange(c, c + n) for c, n in seqs]),
                         torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                         num_decodes=40, max_query_len=int(qlens.max()),
                         max_context_len=int((starts + qlens).max()), block_size=bs)
    t = int(qlens.sum())
    q = torch.randn(t, heads, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(t, kv_heads, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(t, kv_heads, d, device=DEV, dtype=torch.bfloat16)
    for window in (None, 200):
        kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=d ** -0.5,
                  sliding_window=window)
        tri, ref = get_backend("triton", **kw), get_backend("torch", **kw)
        cache = torch.randn(tri.kv_cache_shape(num_blocks, bs), device=DEV, dtype=torch.bfloat16)
        cache32 = cache.float()
        out = tri.forward(q, k, v, cache, tri.build_metadata(layout, DEV))
        want = ref.forward(q.float(), k.float(), v.float(), cache32, ref.build_metadata(layout, DEV))
        cache_ok = torch.equal(cache.float(), cache32)        # both wrote the same slots
        err = ((out.float() - want).norm() / want.norm()).item()
        rows.append(("kernel check", f"triton vs torch backend, bf16, window={window}",
                     f"rel err {err:.1e}, cache writes equal: {cache_ok}"))
        if not (err < 1e-2 and cache_ok):
            raise SystemExit(f"kernel check failed: rel err {err}, cache equal {cache_ok}")
    time_decode_kernel(rows)


def time_decode_kernel(rows: list) -> None:
    """One layer's decode attention, batch 256 with ~1k-token contexts: triton vs torch backend."""
    from triton.testing import do_bench

    from ember.attention import BatchLayout, get_backend

    heads, kv_heads, d, bs, b = 16, 8, 128, 16, 256
    g = torch.Generator().manual_seed(1)
    ctx = torch.randint(512, 1536, (b,), generator=g)
    per = -(-int(ctx.max()) // bs)
    num_blocks = b * per + 1
    tables = torch.randperm(num_blocks, generator=g)[:b * per].view(b, per)
    layout = BatchLayout(torch.ones(b, dtype=torch.long), ctx, ctx - 1, tables, num_decodes=b,
                         max_query_len=1, max_context_len=int(ctx.max()), block_size=bs)
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, scale=d ** -0.5)
    q = torch.randn(b, heads, d, device=DEV, dtype=torch.bfloat16)
    kn = torch.randn(b, kv_heads, d, device=DEV, dtype=torch.bfloat16)
    kv_bytes = int(ctx.sum()) * kv_heads * d * 2 * 2
    for name in ("triton", "torch"):
        be = get_backend(name, **kw)
        cache = torch.randn(be.kv_cache_shape(num_blocks, bs), device=DEV, dtype=torch.bfloat16)
        meta = be.build_metadata(layout, DEV)
        ms = do_bench(lambda: be.forward(q, kn, kn, cache, meta), warmup=50, rep=300,
                      return_mode="median")
        rows.append(("decode attention, 1 layer", f"{name}: B=256, ctx 512..1535",
                     f"{ms * 1e3:.0f} us, {kv_bytes / (ms / 1e3) / 1e9:,.0f} GB/s of KV read"))
        free(cache)


# ---- 2. parity ---------------------------------------------------------------------------------

def parity(rows: list, tmp: str) -> None:
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    cases = {
        "qwen3": Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=True, **TINY),
        "llama": LlamaConfig(num_hidden_layers=3, tie_word_embeddings=False, **TINY),
        "mistral-window24": MistralConfig(num_hidden_layers=3, sliding_window=24,
                                          tie_word_embeddings=False, **TINY),
    }
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, TINY["vocab_size"], (n,), generator=g).tolist()
               for n in (3, 8, 17, 45, 70, 130)]
    for name, cfg in cases.items():
        folder = os.path.join(tmp, name)
        hf = build_model(cfg, folder, torch.float32, seed=len(name))
        llm = LLM(folder, dtype="float32", block_size=8, max_num_batched_tokens=48,
                  kv_cache_memory=64 << 20, max_model_len=512)
        runner = llm.engine.runner
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=0),
                            use_tqdm=False)
        same, worst = 0, 0.0
        for prompt, out in zip(prompts, outs):
            ids = torch.tensor([prompt], device=DEV)
            with torch.inference_mode():
                ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=12, pad_token_id=2)[0, len(prompt):].tolist()
                got = out.outputs[0].token_ids
                same += got == ref
                full = torch.tensor([prompt + got], device=DEV)
                lp = hf(full).logits[0].float().log_softmax(-1)
            for i, (tok, entry) in enumerate(zip(got, out.outputs[0].logprobs)):
                worst = max(worst, abs(entry[tok].logprob - lp[len(prompt) - 1 + i, tok].item()))
        backend = type(runner.backend).__name__
        replays = runner.graphs.replays if runner.graphs is not None else 0
        ok = same == len(prompts) and worst < 1e-3 and replays > 0
        rows.append(("parity vs transformers", f"{name} fp32, {backend}, graph replays {replays}",
                     f"greedy identical {same}/{len(prompts)}, max |dlogprob| {worst:.1e}"
                     + ("" if ok else "  FAILED")))
        free(llm, hf)


# ---- 3. benchmark ------------------------------------------------------------------------------

def bandwidth_gbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    sync()
    secs = start.elapsed_time(end) / 1e3 / 20
    free(x, y)
    return 2 * (1 << 30) / secs / 1e9         # bytes read + written


def workload(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    return prompts, [rng.randint(100, 1024) for _ in range(n)]


def hf_throughput(model, prompts, outs) -> float:
    """One left-padded batch; every row generates max(outs) tokens. Returns seconds."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=DEV)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=DEV)
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.6, top_k=0,
                             max_new_tokens=max(outs), min_new_tokens=max(outs), pad_token_id=0)
    sync()
    assert out.shape[1] == width + max(outs)
    return time.perf_counter() - t


def hf_decode_ms(model, prompt, n: int) -> float:
    ids = torch.tensor([prompt], device=DEV)

    def run(k):
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=k, min_new_tokens=k, pad_token_id=0)
        sync()
        return time.perf_counter() - t

    run(8)
    return (run(n + 1) - min(run(1) for _ in range(2))) / n * 1e3


def ember_run(llm, prompts, outs, temperature=0.6) -> float:
    params = [SamplingParams(temperature=temperature, ignore_eos=True, max_tokens=o, seed=None)
              for o in outs]
    sync()
    t = time.perf_counter()
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    sync()
    secs = time.perf_counter() - t
    got = [len(r.outputs[0].token_ids) for r in res]
    if got != list(outs):
        raise SystemExit("ember produced the wrong number of tokens")
    return secs


def ember_decode_ms(llm, prompt, n: int) -> float:
    run = lambda k: ember_run(llm, [prompt], [k], temperature=0)      # noqa: E731
    run(8)
    return (min(run(n + 1) for _ in range(2)) - min(run(1) for _ in range(3))) / n * 1e3


def benchmark(rows: list, tmp: str, args) -> None:
    from transformers import Qwen3Config

    n_seqs = 32 if args.quick else 256
    prompts, outs = workload(n_seqs)
    hf_n = min(args.hf_batch, n_seqs)
    folder = os.path.join(tmp, "qwen3-0.6b-shape")
    hf = build_model(Qwen3Config(**QWEN3_06B), folder, torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())   # tied: once
    bw = bandwidth_gbs()
    roofline_ms = weight_bytes / bw / 1e6
    b1_prompt, b1_n = prompts[0][:128], 64 if args.quick else 256
    res = {"weight_bytes": weight_bytes, "bandwidth_gbs": bw, "roofline_ms": roofline_ms}
    if not args.skip_hf:
        res["hf_b1_ms"] = hf_decode_ms(hf, b1_prompt, b1_n)
        res["hf_secs"] = hf_throughput(hf, prompts[:hf_n], outs[:hf_n])
        res["hf_padded_tokens"] = hf_n * max(outs[:hf_n])
    free(hf)
    for variant in (["", "unfused"] if args.unfused else [""]):
        if variant:
            use_torch_elementwise()
        ember_bench(res, variant, folder, prompts, outs, hf_n, b1_prompt, b1_n, args)
    table(rows, res, n_seqs, hf_n, sum(outs), sum(outs[:hf_n]), b1_n)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(res, f, indent=1)


def ember_bench(res, variant, folder, prompts, outs, hf_n, b1_prompt, b1_n, args) -> None:
    llm = LLM(folder, dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=16384,
              max_model_len=2048)
    ember_run(llm, prompts[:8], [16] * 8)                            # warm-up (triton compiles)
    runner, v = llm.engine.runner, variant
    res[f"ember{v}_secs"] = ember_run(llm, prompts, outs)
    res[f"ember{v}_subset_secs"] = ember_run(llm, prompts[:hf_n], outs[:hf_n])
    res[f"ember{v}_b1_ms"] = ember_decode_ms(llm, b1_prompt, b1_n)
    graphs, runner.graphs = runner.graphs, None                      # the same engine, eager
    res[f"ember{v}_b1_eager_ms"] = ember_decode_ms(llm, b1_prompt, b1_n)
    if args.eager_throughput and not variant:
        res["ember_eager_secs"] = ember_run(llm, prompts, outs)
    runner.graphs = graphs
    if args.profile:
        res[f"ember{v}_host_breakdown"] = breakdown(llm, prompts, outs)
        profile(llm, prompts[:64], outs[:64], args.out, variant)
    res["summary"] = llm.engine.summary
    del llm, runner, graphs
    free()


def table(rows, r, n_seqs, hf_n, tokens, hf_tokens, b1_n) -> None:
    variants = [v for v in ("", "unfused") if f"ember{v}_secs" in r]
    label = {"": "ember", "unfused": "ember, elementwise ops in torch (no Triton fusions)"}
    hf_tps = hf_tokens / r["hf_secs"] if "hf_secs" in r else None
    for v in variants:
        tps, sub = tokens / r[f"ember{v}_secs"], hf_tokens / r[f"ember{v}_subset_secs"]
        rows.append(("nano-vllm workload", f"{label[v]}, {n_seqs} seqs ({tokens} output tokens)",
                     f"{tps:,.0f} tok/s ({r[f'ember{v}_secs']:.1f} s)"))
        if not v and "ember_eager_secs" in r:
            rows.append(("nano-vllm workload", "ember eager (no decode graphs)",
                         f"{tokens / r['ember_eager_secs']:,.0f} tok/s "
                         f"({r['ember_eager_secs']:.1f} s)"))
        rows.append(("nano-vllm workload", f"{label[v]}, first {hf_n} seqs ({hf_tokens} tokens)",
                     f"{sub:,.0f} tok/s ({r[f'ember{v}_subset_secs']:.1f} s)"
                     + (f" = {sub / hf_tps:.1f}x transformers" if hf_tps else "")))
    if hf_tps:
        rows.append(("nano-vllm workload",
                     f"transformers generate, first {hf_n} seqs, 1 padded batch",
                     f"{hf_tps:,.0f} useful tok/s ({r['hf_secs']:.1f} s; "
                     f"{r['hf_padded_tokens'] / r['hf_secs']:,.0f} incl. padding)"))
    roof = r["roofline_ms"]
    rows.append(("batch-1 decode", f"HBM roofline: {r['weight_bytes'] / 1e9:.2f} GB weights / "
                 f"{r['bandwidth_gbs']:,.0f} GB/s (copy)", f"{roof:.3f} ms/token"))
    b1 = [(f"ember{v}_b1_ms", f"{label[v]}, decode graphs") for v in variants]
    b1 += [(f"ember{v}_b1_eager_ms", f"{label[v]}, eager") for v in variants]
    for key, name in b1 + [("hf_b1_ms", "transformers generate")]:
        if key in r:
            ratio = f", transformers {r['hf_b1_ms'] / r[key]:.1f}x slower" if "hf_b1_ms" in r \
                and key != "hf_b1_ms" else ""
            rows.append(("batch-1 decode", f"{name} (128-token prompt, {b1_n} tokens)",
                         f"{r[key]:.3f} ms/token = {100 * roof / r[key]:.0f}% of roofline{ratio}"))


def breakdown(llm, prompts, outs) -> dict:
    """Wall time per engine phase over the 256-sequence workload (cut to 300 output tokens),
    synchronising around the runner so that its share includes the GPU's."""
    eng = llm.engine
    spent = {"schedule": 0.0, "execute (runner, incl. GPU)": 0.0, "update + outputs": 0.0}
    sched, execute, update = eng.scheduler.schedule, eng.runner.execute, eng._process_outputs

    def timed(key, fn):
        def wrapper(*a, **kw):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync()
                spent[key] += time.perf_counter() - t
        return wrapper
    eng.scheduler.schedule = timed("schedule", sched)
    eng.runner.execute = timed("execute (runner, incl. GPU)", execute)
    eng._process_outputs = timed("update + outputs", update)
    try:
        secs = ember_run(llm, prompts, [min(o, 300) for o in outs])
    finally:
        del eng.scheduler.schedule, eng.runner.execute, eng._process_outputs
    spent["total"] = secs
    print("host breakdown (s):", json.dumps(spent))
    return spent


def profile(llm, prompts, outs, out_dir, variant) -> None:
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        ember_run(llm, prompts, [min(o, 200) for o in outs])
    text = p.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
    text += "\n" + p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    with open(os.path.join(out_dir, f"profile{variant}.txt"), "w") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers baselines")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--eager-throughput", action="store_true",
                    help="also run the 256-sequence workload without decode graphs")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of 64 sequences")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--unfused", action="store_true",
                    help="also run ember with its elementwise ops in torch instead of the Triton "
                         "fusions (triton_cuda.py)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for skip, fn in ((args.skip_kernels, lambda: check_kernels(rows)),
                         (args.skip_parity, lambda: parity(rows, tmp)),
                         (args.skip_bench, lambda: benchmark(rows, tmp, args))):
            if not skip:
                fn()
    name = torch.cuda.get_device_name()
    print(f"\n{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"run took {time.perf_counter() - t0:.0f} s")
    w = max(len(r[1]) for r in rows)
    for section, what, value in rows:
        print(f"{section:<26} {what:<{w}}  {value}")


if __name__ == "__main__":
    main()
