"""Rotary position embedding (RoPE), computed as transformers computes it.

inv_freq, cos and sin are computed in float32 and only then cast to the activations' dtype, as in
transformers' LlamaRotaryEmbedding, so float64 runs agree with transformers to rounding error instead of
to float32 precision.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """RoPE settings as one dict with 'rope_type' and 'rope_theta' (plus the scaling keys).

    transformers 5 keeps them all in `config.rope_parameters`; older configs (and raw config.json files)
    have `rope_theta` next to an optional `rope_scaling` dict whose type key may be the legacy 'type'.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """float32 [head_dim // 2], the same operations in the same order as transformers' rope init functions."""
    rope_type = params["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    base = params["rope_theta"]
    # On the CPU, as transformers computes it at init: a GPU's pow may round differently.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    if rope_type == "linear":
        inv_freq /= params["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency scaling: low frequencies divided by `factor`, high ones kept, smooth between."""
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, params: dict[str, Any]):
        super().__init__()
        inv_freq = inverse_frequencies(head_dim, params)
        self.inv_freq = nn.Buffer(inv_freq.to(torch.get_default_device()), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [T, 1, head_dim] (broadcast over heads), in `dtype`."""
        freqs = positions[:, None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated in the 'rotate half' layout of HF Llama checkpoints."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on q and k; on CUDA one fused Triton kernel for both (tprun/worker/layers/fused_cuda.py)."""
    if q.is_cuda:
        from tprun.worker.layers import fused_cuda

        if fused_cuda.fused_ok(q):
            return fused_cuda.rotary_qk(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
