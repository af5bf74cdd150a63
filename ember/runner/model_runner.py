"""Turns a SchedulerOutput into tensors once per step, runs the model, samples.

Batch order inside a step: decodes (one new token) first, then prefill chunks, as the attention
backends expect. Host work is per request, never per token; the one device→host copy per step is
the sampled tokens (and logprobs when asked).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember import platforms
from ember.attention import AttentionBackend, BatchLayout
from ember.config import EngineConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.scheduler import SchedulerOutput
from ember.outputs import Logprobs
from ember.runner.graphs import DecodeGraphs, supports_graphs
from ember.runner.sampler import Sampler, SamplerOutput, SamplingBatch

MAX_GRAPH_BATCH = 512       # larger pure-decode steps run eagerly


@dataclass
class RunnerOutput:
    sampled: list[int | None]               # aligned with SchedulerOutput.scheduled
    logprobs: list[Logprobs | None]


def kv_bytes_per_block(cfg: EngineConfig) -> int:
    m = cfg.model_config
    elem = torch.empty(0, dtype=cfg.dtype).element_size()
    return m.num_layers * 2 * cfg.cache.block_size * m.num_kv_heads * m.head_dim * elem


class ModelRunner:
    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, backend: AttentionBackend,
                 num_blocks: int) -> None:
        self.cfg, self.model, self.backend = cfg, model, backend
        self.device = cfg.device
        shape = backend.kv_cache_shape(num_blocks, cfg.cache.block_size)
        # Zeroed: slots never written (the tail of a last block, padding) must hold finite values,
        # since masked attention still multiplies them by probability 0.
        self.kv_caches = [platforms.zeros(shape, cfg.dtype, self.device)
                          for _ in range(cfg.model_config.num_layers)]
        self.sampler = Sampler(self.device, cfg.seed)
        self.graphs = None
        if (platforms.graphs_supported(self.device) and not cfg.enforce_eager
                and supports_graphs(backend)):
            bs = cfg.cache.block_size
            self.graphs = DecodeGraphs(model, backend, self.kv_caches,
                                       min(cfg.scheduler.max_num_seqs, MAX_GRAPH_BATCH),
                                       -(-cfg.scheduler.max_model_len // bs), self.device)

    def _layout(self, sched, kv: KVCacheManager) -> BatchLayout:
        reqs = [s.request for s in sched]
        qlens = torch.tensor([s.num_new_tokens for s in sched])
        starts = torch.tensor([r.num_computed_tokens for r in reqs])
        tables = [kv.block_table(r.request_id) for r in reqs]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        # position of every new token: its request's start + its offset inside the chunk
        if len(sched) == int(qlens.sum()):          # pure decode: one token at its start
            positions = starts.clone()
        else:
            offsets = torch.arange(int(qlens.sum())) - torch.repeat_interleave(qlens.cumsum(0) - qlens, qlens)
            positions = torch.repeat_interleave(starts, qlens) + offsets
        return BatchLayout(qlens, starts + qlens, positions, block_tables,
                           num_decodes=int((qlens == 1).sum()), max_query_len=int(qlens.max()),
                           max_context_len=int((starts + qlens).max()),
                           block_size=self.cfg.cache.block_size)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, kv: KVCacheManager) -> RunnerOutput:
        # decodes first (stable), remembering where each scheduled request went
        order = sorted(range(len(out.scheduled)), key=lambda i: out.scheduled[i].num_new_tokens != 1)
        sched = [out.scheduled[i] for i in order]
        layout = self._layout(sched, kv)
        input_ids = torch.tensor([t for s in sched for t in s.request.all_token_ids[
            s.request.num_computed_tokens:s.request.num_computed_tokens + s.num_new_tokens]])
        sampling_rows = [i for i, s in enumerate(sched) if s.samples]
        logits = hidden = None
        if (self.graphs is not None and len(sampling_rows) == len(sched)
                and self.graphs.can_run(layout)):
            logits = self.graphs.run(input_ids, layout)
        else:
            hidden = self._forward_eager(input_ids, layout, sampling_rows)
        sampled: list[int | None] = [None] * len(sched)
        logprobs: list[Logprobs | None] = [None] * len(sched)
        if sampling_rows:
            reqs = [sched[i].request for i in sampling_rows]
            batch = SamplingBatch.build(reqs, self.cfg.model_config.vocab_size, self.device)
            res = self._sample(batch, hidden, logits)
            tokens = res.token_ids.tolist()
            lp = self._logprobs(res, batch) if res.logprobs is not None else [None] * len(reqs)
            for row, tok, lpi in zip(sampling_rows, tokens, lp):
                sampled[row], logprobs[row] = tok, lpi
        # back to the scheduler's order
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        return RunnerOutput([sampled[p] for p in inverse], [logprobs[p] for p in inverse])

    def _forward_eager(self, input_ids, layout: BatchLayout, sampling_rows) -> torch.Tensor | None:
        """The final hidden state of each sampling row's last token (None if no row samples)."""
        meta = self.backend.build_metadata(layout, self.device)
        hidden = self.model(input_ids.to(self.device), layout.positions.to(self.device),
                            self.kv_caches, meta)
        if not sampling_rows:
            return None
        last_token = (layout.query_lens.cumsum(0) - 1)[sampling_rows]
        return hidden[last_token.to(self.device)]

    def _sample(self, batch: SamplingBatch, hidden: torch.Tensor | None,
                logits: torch.Tensor | None) -> SamplerOutput:
        """Tokens for the sampling rows, from their logits or else their hidden states. When every
        row takes the argmax of logits left as they are, the model's greedy kernel answers from
        the hidden states without computing the logits (the same tokens)."""
        if logits is None:
            if batch.argmax_only and (tokens := self.model.greedy_tokens(hidden)) is not None:
                return SamplerOutput(tokens)
            logits = self.model.compute_logits(hidden)
        return self.sampler(logits, batch)

    @staticmethod
    def _logprobs(res, batch: SamplingBatch) -> list[Logprobs | None]:
        vals, ids, ranks = res.logprobs.tolist(), res.logprob_ids.tolist(), res.ranks.tolist()
        result = []
        for v, i, rank, k in zip(vals, ids, ranks, batch.num_logprobs):
            result.append(None if k is None else
                          Logprobs(i[0], v[0], rank, list(zip(i[1:1 + k], v[1:1 + k]))))
        return result
