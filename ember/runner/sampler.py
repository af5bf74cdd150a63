"""Sampling for the whole batch at once: one row per request that samples this step.

Order: raw logprobs (what the model said) → penalties → min_tokens masking → greedy rows take
argmax; random rows: temperature → top-k/top-p/min-p masks (one sort) → Gumbel-style pick
argmax(p / q), q ~ Exp(1). Seeded requests draw q from their own generator, so a seed gives the
same text whatever else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ember import kernels
from ember.core.request import Request


@dataclass
class SamplingBatch:
    temperature: torch.Tensor            # [B] (0 where greedy)
    greedy: torch.Tensor                 # [B] bool
    all_greedy: bool
    any_greedy: bool
    top_k: torch.Tensor | None           # [B] int, vocab size where disabled
    top_p: torch.Tensor | None           # [B]
    min_p: torch.Tensor | None           # [B]
    penalties: tuple | None              # (rep [B], presence [B], frequency [B], prompt ids [B, P], output ids [B, O])
    banned: tuple | None                 # (rows, token ids): stop tokens masked for min_tokens
    generators: list                     # per row: torch.Generator or None
    num_logprobs: list[int | None]       # per row

    @property
    def argmax_only(self) -> bool:
        """Every row greedy, and nothing changes the logits or reports them: a row's token is the
        argmax of its raw logits."""
        return (self.all_greedy and self.penalties is None and self.banned is None
                and all(k is None for k in self.num_logprobs))

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int, device: torch.device) -> "SamplingBatch":
        sps = [r.sampling_params for r in requests]

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        greedy = [sp.greedy for sp in sps]
        temp = col([0.0 if g else sp.temperature for g, sp in zip(greedy, sps)])
        top_k = top_p = min_p = None
        if any(sp.top_k for sp in sps):
            top_k = col([sp.top_k or vocab_size for sp in sps], torch.long).clamp(max=vocab_size)
        if any(sp.top_p < 1 for sp in sps):
            top_p = col([sp.top_p for sp in sps])
        if any(sp.min_p > 0 for sp in sps):
            min_p = col([sp.min_p for sp in sps])
        return cls(temp, col(greedy, torch.bool), all(greedy), any(greedy), top_k, top_p, min_p,
                   _penalties(requests, device), _banned(requests, device),
                   [r.generator for r in requests], [sp.logprobs for sp in sps])


def _padded(rows: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _penalties(requests: list[Request], device) -> tuple | None:
    sps = [r.sampling_params for r in requests]
    if all(sp.repetition_penalty == 1 and sp.presence_penalty == 0 and sp.frequency_penalty == 0
           for sp in sps):
        return None
    col = lambda vals: torch.tensor(vals, dtype=torch.float32, device=device)
    return (col([sp.repetition_penalty for sp in sps]), col([sp.presence_penalty for sp in sps]),
            col([sp.frequency_penalty for sp in sps]),
            _padded([r.prompt_token_ids for r in requests], -1, device),
            _padded([r.output_token_ids for r in requests], -1, device))


def _banned(requests: list[Request], device) -> tuple | None:
    rows, ids = [], []
    for i, r in enumerate(requests):
        sp = r.sampling_params
        if r.num_output_tokens < sp.min_tokens:
            stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(r.eos_token_ids))
            rows += [i] * len(stops)
            ids += sorted(stops)
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(ids, device=device)


def _token_counts(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, N] token ids padded with -1 → [B, V] occurrence counts."""
    counts = torch.zeros(ids.shape[0], vocab + 1, device=ids.device)
    counts.scatter_add_(1, ids.clamp(min=-1) % (vocab + 1), torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]      # -1 wrapped to column `vocab`, dropped here


def apply_penalties(logits: torch.Tensor, pen: tuple) -> torch.Tensor:
    rep, presence, frequency, prompt_ids, output_ids = pen
    vocab = logits.shape[1]
    out_counts = _token_counts(output_ids, vocab)
    seen = (out_counts + _token_counts(prompt_ids, vocab)) > 0
    rep = rep.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency.unsqueeze(1) * out_counts
    return logits - presence.unsqueeze(1) * (out_counts > 0).to(logits.dtype)


def apply_top_k_top_p_min_p(logits: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    if b.top_k is None and b.top_p is None and b.min_p is None:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    rank = torch.arange(logits.shape[1], device=logits.device)
    if b.top_k is not None:
        drop |= rank >= b.top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    if b.top_p is not None:
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop |= (probs.cumsum(-1) - probs) >= b.top_p.unsqueeze(1)
    if b.min_p is not None:
        drop |= probs < b.min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(b: SamplingBatch, shape, device, default_gen) -> torch.Tensor:
    q = torch.empty(shape, device=device).exponential_(generator=default_gen)
    for row, gen in enumerate(b.generators):
        if gen is not None:
            q[row].exponential_(generator=gen)
    return q


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor                        # [B]
    logprobs: torch.Tensor | None = None           # [B, 1 + K] chosen token first, then top K
    logprob_ids: torch.Tensor | None = None        # [B, 1 + K]
    ranks: torch.Tensor | None = None              # [B] rank of the chosen token (1 = best)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, b: SamplingBatch) -> SamplerOutput:
        if b.argmax_only:
            return SamplerOutput(kernels.argmax(logits))     # the logits as they are, read once
        logits = logits.float()
        raw_logprobs = logits.log_softmax(-1) if any(k is not None for k in b.num_logprobs) else None
        if b.penalties is not None:
            logits = apply_penalties(logits, b.penalties)
        if b.banned is not None:
            logits = logits.index_put(b.banned, torch.tensor(float("-inf"), device=logits.device))
        if b.all_greedy:
            tokens = kernels.argmax(logits)
        else:
            scaled = logits / torch.where(b.greedy, 1.0, b.temperature).unsqueeze(1)
            probs = apply_top_k_top_p_min_p(scaled, b).softmax(-1)
            q = _exponential_noise(b, probs.shape, probs.device, self.generator)
            tokens = (probs / q).argmax(-1)
            if b.any_greedy:            # (a full pass over [B, V] saved when no row is greedy)
                tokens = torch.where(b.greedy, kernels.argmax(logits), tokens)
        out = SamplerOutput(tokens)
        if raw_logprobs is not None:
            k = max(n or 0 for n in b.num_logprobs)
            chosen = raw_logprobs.gather(1, tokens.unsqueeze(1))
            top_vals, top_ids = raw_logprobs.topk(k, dim=-1) if k else (chosen[:, :0], tokens[:, None][:, :0])
            out.logprobs = torch.cat([chosen, top_vals], 1)
            out.logprob_ids = torch.cat([tokens.unsqueeze(1), top_ids], 1)
            out.ranks = (raw_logprobs > chosen).sum(-1) + 1
        return out
