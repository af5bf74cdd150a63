"""The `ember` command: `serve` (OpenAI-compatible server), `generate` (one prompt, streamed) and
`chat` (interactive terminal chat). Heavy imports happen inside the subcommands so that
`ember --help` is instant."""
from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys

from ember import startup_gc

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6,
          "mib": 1 << 20, "g": 1e9, "gb": 1e9, "gib": 1 << 30}


def parse_memory(text: str) -> int | float:
    """'0.5' → a fraction of free memory; '2GiB', '512MB', '1000000' → bytes."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size or a fraction: {text!r}")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and value <= 1:
        return value
    return int(value * _UNITS[unit])


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, help="sequences batched together (default 128)")
    p.add_argument("--max-num-batched-tokens", type=int, help="prefill tokens per step, decodes ride along (default 1024 on the CPU, 2048 elsewhere)")
    p.add_argument("--kv-cache-memory", type=parse_memory,
                   help="KV cache size: bytes ('2GiB') or a fraction of free memory ('0.5')")
    p.add_argument("--no-prefix-cache", action="store_true", help="disable prefix caching")
    p.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling")
    p.add_argument("--quantization", choices=["int8", "w8a8"],
                   help="on the CPU kernels: int8 = weight-only int8 (bf16 activations); w8a8 = "
                        "int8 weights and int8 activations (per block of 64, VNNI)")


def _engine_options(args) -> dict:
    opts = {"dtype": args.dtype, "max_model_len": args.max_model_len,
            "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
            "kv_cache_memory": args.kv_cache_memory,
            "enable_prefix_caching": not args.no_prefix_cache, "seed": args.seed,
            "quantization": args.quantization}
    return {k: v for k, v in opts.items() if v is not None}   # unset: the engine's defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="ember: a PyTorch-native LLM engine")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    s.add_argument("model", nargs="?", help="HF folder, repo id or .gguf (default: SmolLM2-135M)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health, /); "
                   "default: $EMBER_API_KEY (keeps the key out of the process list)")
    s.add_argument("--served-model-name", help="the model id clients send (default: its name)")
    s.add_argument("--max-waiting", type=int, default=1024,
                   help="answer 503 while this many sequences wait to be scheduled")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="413 above this body size")
    s.add_argument("--metrics-public", action="store_true", help="/metrics without the API key")
    s.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="seconds in-flight responses get to finish on SIGTERM")
    s.add_argument("--log-level", default="warning")
    s.add_argument("--on-engine-failure", choices=("restart", "exit"), default="restart",
                   help="when the engine thread dies: rebuild its state and serve again "
                        "(default), or exit with status 3 for a process supervisor to restart")
    s.add_argument("--max-engine-restarts", type=int, default=5,
                   help="restarts allowed within 10 minutes before exiting with status 3")
    s.add_argument("--debug-endpoints", action="store_true",
                   help="GET /debug/engine: allocator and request bookkeeping (for tests)")
    _add_engine_args(s)

    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    g.add_argument("prompt")
    g.add_argument("--model")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--dtype", default="auto")

    c = sub.add_parser("chat", help="interactive chat in the terminal (/exit or EOF quits)")
    c.add_argument("--model")
    c.add_argument("--system", help="a system prompt")
    c.add_argument("--max-tokens", type=int, default=512)
    c.add_argument("--temperature", type=float, default=0.7)
    c.add_argument("--dtype", default="auto")
    return parser


async def print_stream(engine, prompt, params) -> str:
    """Print one request's text as it streams; returns the whole text."""
    import uuid
    text = ""
    async for out in engine.generate(prompt, params, uuid.uuid4().hex):
        new = out.outputs[0].text
        print(new[len(text):], end="", flush=True)
        text = new
    return text


def _load_engine(model: str | None, **options):
    # The async engine steps in its own thread, as under `serve`: one code path for all
    # commands (and torch's OpenMP pool behaves better there than in the main thread).
    from ember.engine.async_engine import AsyncLLMEngine
    engine = AsyncLLMEngine.from_options(model, **options)
    print(engine.engine.summary, file=sys.stderr, flush=True)
    startup_gc.started()
    return engine


def cmd_serve(args) -> int:
    from ember.config import env_str
    from ember.engine.interface import FaultInjector
    from ember.engine.process import EngineProcess
    if args.max_waiting is not None and args.max_waiting < 1:
        raise SystemExit("--max-waiting must be at least 1")
    if args.max_engine_restarts < 0:
        raise SystemExit("--max-engine-restarts must be at least 0")
    args.api_key = args.api_key or env_str("EMBER_API_KEY") or None
    try:
        FaultInjector.from_env()    # test-only; checked here, injected by the engine process
    except ValueError as e:
        raise SystemExit(str(e)) from None
    # The engine process forks now and loads while this one imports the HTTP stack.
    engine_process = EngineProcess(args.model, _engine_options(args))
    try:
        from ember.server.api_server import serve
        engine = engine_process.connect()
    except BaseException:
        engine_process.kill()
        raise
    print(engine.summary, flush=True)
    startup_gc.started()
    try:
        return serve(engine, args)
    finally:
        engine.shutdown()


def cmd_generate(args) -> int:
    from ember.sampling_params import SamplingParams
    engine = _load_engine(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    try:
        asyncio.run(print_stream(engine, args.prompt, params))
        print()
    finally:
        engine.shutdown()
    return 0


def cmd_chat(args) -> int:
    from ember.sampling_params import SamplingParams
    engine = _load_engine(args.model, dtype=args.dtype)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    history = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; /exit or Ctrl-D quits", file=sys.stderr)
    try:
        while _chat_turn(engine, history, params):
            pass
    finally:
        engine.shutdown()
    return 0


def _chat_turn(engine, history: list[dict], params) -> bool:
    """One exchange; False when the user is done."""
    try:
        line = input("> ")
    except EOFError:
        print()
        return False
    if line.strip() in ("/exit", "/quit"):
        return False
    if not line.strip():
        return True
    history.append({"role": "user", "content": line})
    try:
        ids = engine.engine.tokenizer.apply_chat_template(history, True)
        reply = asyncio.run(print_stream(engine, {"prompt_token_ids": ids}, params))
    except KeyboardInterrupt:                # stop this answer, keep the conversation
        print(" [interrupted]")
        history.pop()
        return True
    except ValueError as e:                  # e.g. the conversation outgrew the context
        print(f"error: {e}", file=sys.stderr)
        history.pop()
        return True
    print()
    history.append({"role": "assistant", "content": reply})
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    command = {"serve": cmd_serve, "generate": cmd_generate, "chat": cmd_chat}[args.command]
    with startup_gc.paused():    # until the command calls startup_gc.started()
        return command(args)


if __name__ == "__main__":
    sys.exit(main())
