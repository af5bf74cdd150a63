from __future__ import annotations

import torch
from torch import nn

from ember import kernels


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as transformers does); optionally fused with the residual add."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x), or (norm(x + residual), x + residual)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)
