"""Rotary position embedding (RoPE), computed as transformers computes it.

inv_freq, cos and sin are computed in float32 and only then cast to the activations' dtype, as in
transformers' LlamaRotaryEmbedding, so float64 runs agree with transformers to rounding error instead of
to float32 precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tprun.worker.attention_metadata import AttentionMetadata

LOCAL_ROPE_TYPES = ("default", "linear", "llama3")
# Computed by transformers' own rope init functions, so they read the config exactly as transformers does.
HF_ROPE_TYPES = ("yarn", "longrope")
SUPPORTED_ROPE_TYPES = LOCAL_ROPE_TYPES + HF_ROPE_TYPES


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> dict[str, Any]:
    """RoPE settings as one dict with 'rope_type' and 'rope_theta' (plus the scaling keys).

    transformers 5 keeps them all in `config.rope_parameters`; older configs (and raw config.json files)
    have `rope_theta` next to an optional `rope_scaling` dict whose type key may be the legacy 'type'.
    Gemma 3 keeps one dict per layer type ('sliding_attention': local base, 'full_attention': global).
    """
    raw = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if layer_type is not None and isinstance(raw.get(layer_type), dict):
        raw = raw[layer_type]
    params = dict(raw)
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if params["rope_type"] == "llama3":
        params.setdefault("original_max_position_embeddings", hf_config.max_position_embeddings)
    return params


def inverse_frequencies(head_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """float32 [head_dim // 2], the same operations in the same order as transformers' rope init functions."""
    rope_type = params["rope_type"]
    if rope_type not in LOCAL_ROPE_TYPES:
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


@dataclass
class RopeTables:
    inv_freq: torch.Tensor  # float32 [rotary_dim // 2]
    attention_scaling: float = 1.0  # cos and sin are multiplied by it (YaRN, LongRoPE)
    long_inv_freq: torch.Tensor | None = None  # LongRoPE: for sequences past original_max
    original_max: int = 0


def rope_tables(head_dim: int, params: dict[str, Any], hf_config: Any = None, layer_type: str | None = None) -> RopeTables:
    rope_type = params["rope_type"]
    if rope_type not in HF_ROPE_TYPES:
        rotary_dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        return RopeTables(inverse_frequencies(rotary_dim, params))
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise ValueError(f"rope type {rope_type!r} needs the transformers config of the model")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    init = ROPE_INIT_FUNCTIONS[rope_type]
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    inv_freq, scaling = init(hf_config, torch.device("cpu"), **kwargs)
    if rope_type != "longrope":
        return RopeTables(inv_freq, float(scaling))
    original_max = params["original_max_position_embeddings"]
    long_inv_freq, _ = init(hf_config, torch.device("cpu"), seq_len=original_max + 1, **kwargs)
    return RopeTables(inv_freq, float(scaling), long_inv_freq, original_max)


class RotaryEmbedding(nn.Module):
    def __init__(
        self, head_dim: int, params: dict[str, Any], hf_config: Any = None, layer_type: str | None = None
    ):
        super().__init__()
        tables = rope_tables(head_dim, params, hf_config, layer_type)
        device = torch.get_default_device()
        self.inv_freq = nn.Buffer(tables.inv_freq.to(device), persistent=False)
        self.attention_scaling = tables.attention_scaling
        self.original_max = tables.original_max
        self.long_inv_freq = (
            None if tables.long_inv_freq is None else nn.Buffer(tables.long_inv_freq.to(device), persistent=False)
        )

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, meta: AttentionMetadata | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, each [T, 1, rotary_dim] (broadcast over heads), in `dtype`."""
        if self.long_inv_freq is None:
            freqs = positions[:, None].float() * self.inv_freq.float()
        else:
            freqs = positions[:, None].float() * self._longrope_inv_freq(positions, meta)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # in float32, before the cast, as transformers
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype).unsqueeze(1), sin.to(dtype).unsqueeze(1)

    def _longrope_inv_freq(self, positions: torch.Tensor, meta: AttentionMetadata | None) -> torch.Tensor:
        """[T, rotary_dim // 2]: the long factors for the tokens of a sequence whose length after this step
        exceeds original_max_position_embeddings, the short ones otherwise; transformers decides the same way
        per forward call (max(position_ids) + 1), which for one sequence is its length after the step."""
        if meta is None:
            seq_len = (positions.max() + 1).expand(positions.shape[0])
        else:
            repeats = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]
            seq_len = torch.repeat_interleave(meta.seq_lens, repeats, output_size=positions.shape[0])
        use_long = (seq_len > self.original_max)[:, None]
        return torch.where(use_long, self.long_inv_freq.float(), self.inv_freq.float())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated in the 'rotate half' layout of HF Llama checkpoints; with a partial
    rotary factor (Phi-3) only the first cos.shape[-1] features rotate, the rest pass through."""
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary on q and k; on CUDA one fused Triton kernel for both (tprun/worker/layers/fused_cuda.py)."""
    if q.is_cuda and cos.shape[-1] == q.shape[-1]:  # the kernel rotates whole heads only
        from tprun.worker.layers import fused_cuda

        if fused_cuda.fused_ok(q):
            return fused_cuda.rotary_qk(q, k, cos, sin)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
