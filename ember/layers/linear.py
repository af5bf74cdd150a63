"""Linear layers written for tensor parallelism (Megatron-style); each layer loads its shard.

ColumnParallel splits the output dimension (no communication after), RowParallel splits the
input dimension (all-reduce after). Merged/QKV variants pack several checkpoint matrices into one
parameter; `weight_loader(param, loaded, shard_id)` writes one of them into its slice.
"""
from __future__ import annotations

import torch
from torch import nn

from ember import kernels
from ember.distributed import SINGLE, ParallelState


class PackedWeight:
    """A layer whose weight the CPU linear kernel may read in its own layout. `pack_weight()` runs
    once the weights are loaded (and again after any weight update); `packed` stays None where the
    kernel does not serve (other devices and dtypes), and torch's linear runs.

    quantization="int8": weight-only int8 with a scale per output row (`scales`). `weight` then
    holds the dequantized values, so that every path computes the same function.
    quantization="w8a8": the same int8 weights, and the inputs quantized to int8 per block of 64
    as each call runs (kernels.quantize_linear_weight_w8a8; `offsets` is then set). A weight the
    W8A8 kernel does not take (K not a multiple of 64) stays weight-only int8."""
    packed: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    offsets: torch.Tensor | None = None

    def pack_weight(self, quantization: str | None = None) -> None:
        self.packed = self.scales = self.offsets = None
        if quantization == "w8a8":
            quantized = kernels.quantize_linear_weight_w8a8(self.weight.data)
            if quantized is not None:
                self.packed, self.scales, self.offsets, dequantized = quantized
                self.weight.data.copy_(dequantized)
                return
            quantization = "int8"
        if quantization == "int8":
            quantized = kernels.quantize_linear_weight_int8(self.weight.data)
            if quantized is not None:
                self.packed, self.scales, dequantized = quantized
                self.weight.data.copy_(dequantized)
                return
        elif quantization is not None:
            raise ValueError(f"unknown quantization {quantization!r}; ember has: int8, w8a8")
        self.packed = kernels.pack_linear_weight(self.weight.data)


def _shard(t: torch.Tensor, dim: int, ps: ParallelState) -> torch.Tensor:
    size = t.shape[dim] // ps.tp_size
    return t.narrow(dim, ps.tp_rank * size, size)


class ColumnParallelLinear(PackedWeight, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 ps: ParallelState = SINGLE) -> None:
        super().__init__()
        if out_features % ps.tp_size:
            raise ValueError(f"{out_features} outputs do not split over {ps.tp_size} ranks")
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(out_features // ps.tp_size, in_features),
                                   requires_grad=False)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features // ps.tp_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(_shard(loaded, 0, self.ps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.packed, self.scales, self.offsets)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked along the output (e.g. gate_proj and up_proj)."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False,
                 ps: ParallelState = SINGLE) -> None:
        super().__init__(in_features, sum(out_sizes), bias, ps)
        self.out_sizes = [s // ps.tp_size for s in out_sizes]

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(first matrix's outputs) · second's, e.g. gate_proj and up_proj: on the CPU kernel
        in one pass, without the [M, 2I] product."""
        return kernels.linear_silu_and_mul(x, self.weight, self.bias, self.packed, self.scales,
                                           self.offsets)

    def _slice(self, shard_id: int) -> tuple[int, int]:
        return sum(self.out_sizes[:shard_id]), self.out_sizes[shard_id]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        start, size = self._slice(shard_id)
        param.data.narrow(0, start, size).copy_(_shard(loaded, 0, self.ps))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matmul; heads split over ranks (KV heads replicated if fewer)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, ps: ParallelState = SINGLE) -> None:
        self.kv_replicas = max(1, ps.tp_size // num_kv_heads)
        kv_out = max(num_kv_heads, ps.tp_size) * head_dim
        super().__init__(hidden, [num_heads * head_dim, kv_out, kv_out], bias, ps)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        idx = "qkv".index(shard_id)
        start, size = self._slice(idx)
        if idx == 0 or self.kv_replicas == 1:
            part = _shard(loaded, 0, self.ps)
        else:
            part = loaded.narrow(0, (self.ps.tp_rank // self.kv_replicas) * size, size)
        param.data.narrow(0, start, size).copy_(part)


class RowParallelLinear(PackedWeight, nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 ps: ParallelState = SINGLE) -> None:
        super().__init__()
        if in_features % ps.tp_size:
            raise ValueError(f"{in_features} inputs do not split over {ps.tp_size} ranks")
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(out_features, in_features // ps.tp_size),
                                   requires_grad=False)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        # the bias is not split: it is added once, after the reduction
        param.data.copy_(loaded if param is self.bias else _shard(loaded, 1, self.ps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.linear(x, self.weight, packed=self.packed, scales=self.scales,
                           offsets=self.offsets)
        y = self.ps.all_reduce(y)
        # The bias is added once, after the reduction.
        return y if self.bias is None else y + self.bias
