"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ember import kernels
from ember.distributed import SINGLE, ParallelState
from ember.layers.linear import PackedWeight


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int, ps: ParallelState = SINGLE) -> None:
        super().__init__()
        self.ps = ps
        self.per_rank = -(-vocab_size // ps.tp_size)
        self.vocab_start = ps.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, dim), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.vocab_start:self.vocab_start + self.per_rank]
        param.data[:part.shape[0]].copy_(part)
        param.data[part.shape[0]:].zero_()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        mine = (local >= 0) & (local < self.per_rank)
        out = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine.unsqueeze(-1)
        return self.ps.all_reduce(out)


class ParallelLMHead(PackedWeight, VocabParallelEmbedding):
    greedy: kernels.GreedyHead | None = None    # argmax without the logits (prepare_greedy)

    def __init__(self, vocab_size: int, dim: int, ps: ParallelState = SINGLE) -> None:
        super().__init__(vocab_size, dim, ps)
        self.vocab_size = vocab_size

    def pack_weight(self, quantization: str | None = None) -> None:
        """As PackedWeight's, except that W8A8 leaves the LM head in the model's dtype (as vLLM's
        W8A8 checkpoints do): its logits keep their precision and greedy rows keep the exact
        argmax kernel; weight-only int8 quantizes it too."""
        super().pack_weight(None if quantization == "w8a8" else quantization)

    def prepare_greedy(self) -> None:
        """After packing: the greedy kernel's tables, where it serves (CPU, bf16, one rank)."""
        self.greedy = (kernels.GreedyHead.prepare(self.weight.data, self.packed)
                       if self.ps.tp_size == 1 and self.scales is None else None)

    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """argmax(self(hidden), -1), the same ids, or None where only the logits can answer."""
        return None if self.greedy is None else self.greedy(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = kernels.linear(hidden, self.weight, packed=self.packed, scales=self.scales)
        return self.ps.all_gather(logits, dim=-1)[..., :self.vocab_size]
