"""Gemma 2 and Gemma 3 (text) on tensor-parallel layers.

Differences from Llama, all as transformers computes them: the +1 RMSNorm in float32 (GemmaRMSNorm), a norm
after attention and around the MLP, GELU-tanh, embeddings scaled by sqrt(hidden_size), the attention scale
from query_pre_attn_scalar, sliding-window layers named by config.layer_types; Gemma 2 soft-caps attention
scores and final logits; Gemma 3 normalises q and k and gives local and global layers their own RoPE base.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tprun.worker.attention_metadata import AttentionMetadata
from tprun.worker.layers import (
    Attention,
    GemmaRMSNorm,
    MergedColumnParallelLinear,
    ParallelLMHead,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    rope_parameters,
)
from tprun.worker.loader import load_weights
from tprun.worker.models.llama import LlamaAttention, head_dim
from tprun.worker.parallel import TPGroup

GELU_TANH = ("gelu_pytorch_tanh", "gelu_python_tanh")


class GemmaMLP(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup):
        super().__init__()
        act = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
        if act not in GELU_TANH:
            raise ValueError(f"hidden_activation {act!r} is not supported; Gemma uses 'gelu_pytorch_tanh'")
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], False, tp, "intermediate_size")
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, False, tp, "intermediate_size")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, layer_idx: int, tp: TPGroup, gemma3: bool):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.layer_type = cfg.layer_types[layer_idx]
        self.self_attn = LlamaAttention(
            cfg, layer_idx, tp, getattr(cfg, "attention_bias", False), qk_norm=gemma3, norm_cls=GemmaRMSNorm,
            scale=cfg.query_pre_attn_scalar**-0.5,
            # transformers' Gemma 3 attention ignores attn_logit_softcapping.
            softcap=None if gemma3 else cfg.attn_logit_softcapping,
        )
        self.mlp = GemmaMLP(cfg, tp)
        self.input_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.hidden_size, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, meta))
        x = x + h
        h = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x + h


class GemmaModel(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup, gemma3: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.embed_scale = cfg.hidden_size**0.5
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i, tp, gemma3) for i in range(cfg.num_hidden_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # One RoPE per layer type (Gemma 3: local base for sliding layers, global base for full ones).
        layer_types = sorted(set(cfg.layer_types))
        self.rotary = nn.ModuleDict({
            t: RotaryEmbedding(head_dim(cfg), rope_parameters(cfg, t if gemma3 else None), cfg, t if gemma3 else None)
            for t in layer_types
        })

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # The scale rounded to the activations' dtype first, as transformers' scaled embedding does; rounded
        # on the host, so no host-to-device copy is captured in a CUDA graph.
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype).item()
        tables = {t: rope(positions, h.dtype, meta) for t, rope in self.rotary.items()}
        for layer in self.layers:
            h = layer(h, *tables[layer.layer_type], meta)
        return self.norm(h)


class Gemma2ForCausalLM(nn.Module):
    gemma3 = False

    def __init__(self, cfg: Any, tp: TPGroup):
        super().__init__()
        self.config = cfg
        self.model = GemmaModel(cfg, tp, self.gemma3)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if getattr(cfg, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(cfg, "final_logit_softcapping", None)

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head.compute_logits(hidden)
        if self.final_logit_softcapping is not None:  # same on every rank: the logits are gathered first
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, model_dir: str | Path) -> None:
        load_weights(self, model_dir)

    @classmethod
    def tp_divisible(cls, cfg: Any) -> dict[str, int]:
        return {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    gemma3 = True
