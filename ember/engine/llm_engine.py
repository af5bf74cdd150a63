"""The engine: requests in, outputs out. Its heartbeat is `step`: schedule → execute → update."""
from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from ember import platforms, startup_gc
from ember.attention import get_backend
from ember.config import CacheConfig, EngineConfig, SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.request import Request, RequestStatus
from ember.core.scheduler import Scheduler
from ember.engine.interface import EngineStats, tokenize_prompt, validate_prompt
from ember.engine.output_processor import RequestState, SequenceState
from ember.models import prepared_cache
from ember.models.loader import build_model, load_checkpoint, resolve_model
from ember.outputs import RequestDelta, RequestOutput, SequenceDelta
from ember.runner.model_runner import ModelRunner, kv_bytes_per_block
from ember.sampling_params import SamplingParams
from ember.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("ember")


_BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="ember-load")


def _check_quantization(quantization: str | None, device: torch.device, dtype: torch.dtype) -> None:
    if quantization is None:
        return
    if quantization not in ("int8", "w8a8"):
        raise ValueError(f"unknown quantization {quantization!r}; ember has: int8, w8a8")
    from ember.kernels import cpu
    if device.type != "cpu" or dtype != torch.bfloat16 or not cpu.has_linear_bf16():
        raise ValueError(f"quantization={quantization!r} runs on ember's CPU kernels: it needs "
                         "dtype bfloat16 on a CPU with AVX-512 and a C++ compiler")
    if quantization == "w8a8" and not cpu.has_w8a8():
        raise ValueError("quantization='w8a8' needs a CPU with AVX-512 VNNI (int8 dot products); "
                         "quantization='int8' (weight-only) runs without it")


class LLMEngine:
    @startup_gc.paused()
    def __init__(self, model: str | None = None, *, dtype: str | torch.dtype | None = "auto",
                 device: str | torch.device | None = None, max_model_len: int | None = None,
                 max_num_seqs: int = 128, max_num_batched_tokens: int | None = None,
                 block_size: int = 16, kv_cache_memory: int | float | None = None,
                 enable_prefix_caching: bool = True, scheduling_policy: str | None = None,
                 attention_backend: str = "auto", seed: int = 0,
                 enforce_eager: bool = False, quantization: str | None = None,
                 detokenize: bool = True) -> None:
        """detokenize=False: step() returns RequestDeltas (token ids, no text) instead of
        RequestOutputs, and the tokenizer is loaded only for requests with stop strings; the
        engine process runs so, and its front end detokenizes (output_processor.RemoteRequest)."""
        t0 = time.perf_counter()
        device = torch.device(device) if device is not None else platforms.default_device()
        dtype = platforms.resolve_dtype(dtype, device)
        _check_quantization(quantization, device, dtype)
        self.source = resolve_model(model)
        model_cfg, weights, total = load_checkpoint(self.source)
        # The tokenizer loads in a background thread, waited for when a request first needs it.
        # Built by transformers (first start) it takes seconds: that starts now, alongside the
        # weights. Read from ember's cache it takes 0.1-0.2 s holding the GIL, which would stall
        # the build as long: that starts at `preload_tokenizer()`, which the engine process
        # (ember/engine/process.py) calls once it has said it is ready, or at the first use.
        self._tokenizer: Tokenizer | None = None
        self._tokenizer_loading = None
        self._tokenizer_eos = model_cfg.eos_token_ids
        self.detokenize = detokenize
        self._eos_token_ids = Tokenizer.cached_eos_token_ids(self.source, self._tokenizer_eos)
        if self._eos_token_ids is None:
            self.preload_tokenizer()
        max_len = max_model_len or model_cfg.max_position_embeddings
        backend = get_backend(attention_backend, device=device, num_heads=model_cfg.num_heads,
                              num_kv_heads=model_cfg.num_kv_heads, head_dim=model_cfg.head_dim,
                              scale=model_cfg.head_dim ** -0.5,
                              sliding_window=model_cfg.sliding_window)
        if max_num_batched_tokens is None:
            max_num_batched_tokens = platforms.default_step_tokens(device)
        policy = scheduling_policy or ("cache_aware" if enable_prefix_caching else "fcfs")
        cfg = EngineConfig(self.source.name, model_cfg,
                           CacheConfig(block_size, kv_cache_memory, enable_prefix_caching),
                           SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_len, policy),
                           device, dtype, seed, enforce_eager)
        self._check_options(cfg)                    # before the slow part
        self.model = build_model(model_cfg, weights, total, backend, max_len, device, dtype,
                                 desc=f"loading {self.source.name}", quantization=quantization,
                                 prepared=prepared_cache.slot_for(self.source, device, dtype,
                                                                  quantization))
        num_blocks = self._num_blocks(cfg)
        if num_blocks * block_size < max_len:
            log.warning("KV cache holds %d tokens < max_model_len %d: capping max_model_len",
                        num_blocks * block_size, max_len)
            cfg = cfg.replace(scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens,
                                                        num_blocks * block_size, policy))
        self.config = cfg
        self._new_request_state(num_blocks)
        self.runner = ModelRunner(cfg, self.model, backend, num_blocks)
        self.stats = EngineStats()
        # Test-only fault injection (EMBER_FAULT_INJECT, see AsyncLLMEngine): called mid-step,
        # after scheduling and before the model runs. None in normal operation.
        self.fault_hook = None
        self._ids = itertools.count()
        self.load_time = time.perf_counter() - t0
        self.summary = (f"ember: {self.source.name} ({model_cfg.architecture}, "
                        f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.1f}M params) "
                        f"dtype={str(dtype).removeprefix('torch.')} device={device} "
                        f"KV cache {num_blocks * block_size:,} tokens, "
                        f"max_model_len {cfg.scheduler.max_model_len}, "
                        f"loaded in {self.load_time:.1f} s")

    def preload_tokenizer(self) -> None:
        if self._tokenizer_loading is None:
            self._tokenizer_loading = _BACKGROUND.submit(Tokenizer.load, self.source,
                                                         self._tokenizer_eos)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self.preload_tokenizer()
            self._tokenizer = self._tokenizer_loading.result()
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self._eos_token_ids is None:
            self._eos_token_ids = self.tokenizer.eos_token_ids
        return self._eos_token_ids

    def _new_request_state(self, num_blocks: int) -> None:
        prefix_cache = None
        if self.config.cache.enable_prefix_caching:
            from ember.core.prefix_cache import RadixPrefixCache
            prefix_cache = RadixPrefixCache()
        self.kv = KVCacheManager(num_blocks, self.config.cache.block_size, prefix_cache)
        self.scheduler = Scheduler(self.config.scheduler, self.kv)
        self.states: dict[str, RequestState] = {}
        self._seqs: dict[str, tuple[RequestState, SequenceState]] = {}   # engine request id → its seq

    def reset(self) -> None:
        """Forget every request: a fresh scheduler, block pool and prefix cache; the weights, the
        runner and its KV tensors stay. Used to restart after a failure left the state unknown.
        Old KV contents are never read again: no block table points at them."""
        self._new_request_state(self.kv.num_blocks)

    @staticmethod
    def _check_options(cfg: EngineConfig) -> None:
        sched, cache = cfg.scheduler, cfg.cache
        for name, value in (("max_num_seqs", sched.max_num_seqs), ("block_size", cache.block_size),
                            ("max_num_batched_tokens", sched.max_num_batched_tokens),
                            ("max_model_len", sched.max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if sched.policy not in ("fcfs", "cache_aware"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'cache_aware', got {sched.policy!r}")
        budget = cache.kv_cache_memory
        if isinstance(budget, int) and budget < kv_bytes_per_block(cfg):
            raise ValueError(f"kv_cache_memory={budget} is less than one KV block "
                             f"({kv_bytes_per_block(cfg)} bytes)")

    @staticmethod
    def _num_blocks(cfg: EngineConfig) -> int:
        budget = cfg.cache.kv_cache_memory
        if budget is None:
            budget = platforms.default_kv_cache_bytes(cfg.device)
        elif isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"kv_cache_memory as a fraction must be in (0, 1], got {budget}")
            budget = int(budget * platforms.available_memory(cfg.device))
        num_blocks = int(budget) // kv_bytes_per_block(cfg)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={cfg.cache.kv_cache_memory} is less than one KV block "
                             f"({kv_bytes_per_block(cfg)} bytes)")
        # More blocks than max_num_seqs full-length sequences can never be used.
        per_seq = -(-cfg.scheduler.max_model_len // cfg.cache.block_size)
        return min(num_blocks, cfg.scheduler.max_num_seqs * per_seq + 1)

    # ---- requests in ----------------------------------------------------------------------

    def tokenize_prompt(self, prompt) -> tuple[str | None, list[int]]:
        return tokenize_prompt(lambda text: self.tokenizer.encode(text),
                               self.config.model_config.vocab_size, prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_prompt(prompt_ids, params, self.config.scheduler.max_model_len)

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        text, ids = self.tokenize_prompt(prompt)
        self.validate(ids, params)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self.states:
            raise ValueError(f"request id {rid!r} is already in use")
        state = RequestState(rid, text, ids)
        parent = None
        for i in range(params.n):
            sp = params.for_child(i) if params.n > 1 else params
            gen = None
            if sp.seed is not None:
                gen = torch.Generator(device=self.config.device).manual_seed(sp.seed)
            req = Request(rid if params.n == 1 else f"{rid}#{i}", ids, sp,
                          self.eos_token_ids, self.config.scheduler.max_model_len,
                          parent=parent, generator=gen)
            parent = parent or req
            detok = None
            if self.detokenize or sp.stop:      # without text, only stop strings need it
                detok = IncrementalDetokenizer(self.tokenizer, ids, sp.skip_special_tokens)
            state.seqs.append(SequenceState(req, i, detok))
        # registered only once every sibling was built: a failure above leaves nothing behind
        for seq in state.seqs:
            self._seqs[seq.request.request_id] = (state, seq)
            self.scheduler.add(seq.request)
        self.states[rid] = state
        return rid

    def abort_request(self, request_id: str) -> None:
        state = self.states.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            self._seqs.pop(seq.request.request_id, None)
            if not seq.request.status.finished:
                self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)

    # ---- the heartbeat ----------------------------------------------------------------------

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if not sched:
            return []
        if self.fault_hook is not None:
            self.fault_hook()
        result = self.runner.execute(sched, self.kv)
        self.stats.prompt_tokens_computed += sum(
            max(0, min(s.request.num_computed_tokens + s.num_new_tokens, s.request.num_prompt_tokens)
                - s.request.num_computed_tokens) for s in sched.scheduled)
        self.scheduler.update(sched, result.sampled)
        return self._process_outputs(sched, result)

    def _process_outputs(self, sched, result) -> list[RequestOutput] | list[RequestDelta]:
        self.stats.preemptions += len(sched.preempted)
        touched: dict[str, tuple[RequestState, list]] = {}    # request id → (state, its tokens)
        for s, token, lp in zip(sched.scheduled, result.sampled, result.logprobs):
            req = s.request
            if token is None:
                continue
            if req.request_id not in self._seqs:
                continue
            state, seq = self._seqs[req.request_id]
            if self.detokenize:
                stop = seq.add_token(token, lp, self.tokenizer)
            else:
                stop = seq.add_text(token) if seq.detok is not None else None
            if stop is not None and not req.status.finished:
                req.stop_reason = stop
                self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            if req.num_output_tokens == 1:
                self.stats.prompt_tokens += req.num_prompt_tokens
                self.stats.cached_prompt_tokens += req.num_cached_tokens
            self.stats.generation_tokens += 1
            touched.setdefault(state.request_id, (state, []))[1].append((seq, token, lp))
        outputs = []
        for rid, (state, tokens) in touched.items():
            outputs.append(state.output() if self.detokenize else self._delta(state, tokens))
            if state.finished:
                self.stats.finished_requests += 1
                del self.states[rid]
                for seq in state.seqs:
                    del self._seqs[seq.request.request_id]
        return outputs

    @staticmethod
    def _delta(state: RequestState, tokens: list) -> RequestDelta:
        seqs = [SequenceDelta(seq.index, token, lp, seq.request.finish_reason,
                              seq.request.stop_reason, seq.request.stopped_by_token)
                for seq, token, lp in tokens]
        return RequestDelta(state.request_id, state.finished,
                            max(s.request.num_cached_tokens for s in state.seqs), seqs)
