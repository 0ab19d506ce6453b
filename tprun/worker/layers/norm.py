"""RMSNorm, numerically identical to transformers' LlamaRMSNorm (the float64 equality tests rely on it)."""

from __future__ import annotations

import torch
from torch import nn

from tprun.worker.layers.sharding import CheckpointTensor, load_replicated, new_param


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_param(hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); with a residual, (RMSNorm(x + residual), x + residual): the residual stream's add
        fused into the norm, as vLLM does. On CUDA one Triton kernel, same rounding (fused_cuda.py)."""
        if x.is_cuda:
            from tprun.worker.layers import fused_cuda

            if fused_cuda.fused_ok(x):
                if residual is None:
                    return fused_cuda.rms_norm(x, self.weight, self.eps)
                return fused_cuda.add_rms_norm(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, in that order, exactly as transformers does.
        input_dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(input_dtype)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        load_replicated(param, loaded)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: weight stored as an offset from 1, and the whole norm (scale included) computed in
    float32 before rounding to the input dtype, exactly as transformers' Gemma2/Gemma3RMSNorm."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)
