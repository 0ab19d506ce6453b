"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3) on tensor-parallel layers; the MoE families
(moe.py) reuse it with another MLP.

Module names follow transformers', so checkpoint names map one to one apart from the fusions listed in
tp_plan.py (q/k/v -> qkv_proj, gate/up -> gate_up_proj). The numerics follow transformers' too: the
float64 tests compare logits with it to rounding error.
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
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    apply_rotary_qk,
    rope_parameters,
)
from tprun.worker.loader import load_weights
from tprun.worker.parallel import TPGroup


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_window(cfg: Any, layer_idx: int) -> int | None:
    """Qwen2/Qwen3 name a per-layer attention type; Mistral applies `sliding_window` to every layer."""
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer_idx] != "sliding_attention":
        return None
    return getattr(cfg, "sliding_window", None)


class LlamaAttention(nn.Module):
    """Also the attention of the other families: Gemma's scale (query_pre_attn_scalar), soft-capping and
    +1 QK-norm, and gpt-oss's sinks come in as keyword arguments."""

    def __init__(
        self, cfg: Any, layer_idx: int, tp: TPGroup, qkv_bias: bool, qk_norm: bool, *,
        norm_cls: type[RMSNorm] = RMSNorm, scale: float | None = None, softcap: float | None = None,
        sinks: bool = False,
    ):
        super().__init__()
        self.head_dim = head_dim(cfg)
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, self.head_dim, cfg.num_attention_heads, num_kv_heads, qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * self.head_dim,
            cfg.hidden_size,
            getattr(cfg, "attention_bias", False),
            tp,
            what="num_attention_heads * head_dim",
        )
        if qk_norm:
            self.q_norm = norm_cls(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = norm_cls(self.head_dim, cfg.rms_norm_eps)
        self.qk_norm = qk_norm
        heads = self.qkv_proj.num_heads_per_rank
        self.attn = Attention(
            heads,
            self.qkv_proj.num_kv_heads_per_rank,
            self.head_dim,
            scale=self.head_dim**-0.5 if scale is None else scale,
            sliding_window=sliding_window(cfg, layer_idx),
            softcap=softcap,
            sinks_total_heads=cfg.num_attention_heads if sinks else None,
            first_head=tp.rank * heads,
        )

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(x.shape[0], -1, self.head_dim)
        k = k.view(x.shape[0], -1, self.head_dim)
        v = v.view(x.shape[0], -1, self.head_dim)
        if self.qk_norm:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary_qk(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(
        self, cfg: Any, tp: TPGroup, intermediate_size: int | None = None, what: str = "intermediate_size",
        reduce_results: bool = True,
    ):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported; the Llama family uses 'silu'")
        bias = getattr(cfg, "mlp_bias", False)
        size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], bias, tp, what)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias, tp, what, reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if gate_up.is_cuda:  # one fused Triton kernel (tprun/worker/layers/fused_cuda.py)
            from tprun.worker.layers import fused_cuda

            if fused_cuda.fused_ok(gate_up):
                return self.down_proj(fused_cuda.silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp  # a dense MLP, or an MoE block (moe.py): either returns the all_reduced output

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the last block's output; residual: the stream it adds to (None at the first layer).

        The same additions as `h = x + attn(norm(x)); h + mlp(norm(h))`, but each is done inside the
        following norm (one fused kernel on CUDA)."""
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, meta), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, tp: TPGroup, family: LlamaForCausalLM):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, family.make_attention(cfg, i, tp), family.make_mlp(cfg, i, tp))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(head_dim(cfg), rope_parameters(cfg), cfg)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary_emb(positions, h.dtype, meta)
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    qk_norm = False  # Qwen3 normalises q and k per head
    always_qkv_bias = False  # Qwen2 has q/k/v biases whatever attention_bias says

    def __init__(self, cfg: Any, tp: TPGroup):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, tp, self)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if getattr(cfg, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    # What a family changes: its attention and its MLP (dense, or MoE in moe.py).
    def qkv_bias(self, cfg: Any) -> bool:
        return self.always_qkv_bias or getattr(cfg, "attention_bias", False)

    def make_attention(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        return LlamaAttention(cfg, layer_idx, tp, self.qkv_bias(cfg), self.qk_norm)

    def make_mlp(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        return LlamaMLP(cfg, tp)

    @classmethod
    def tp_divisible(cls, cfg: Any) -> dict[str, int]:
        """What the tensor-parallel size must divide (checked before any rendezvous)."""
        return {"num_attention_heads": cfg.num_attention_heads, "intermediate_size": cfg.intermediate_size}

    @property
    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids and positions [T] -> final hidden states [T, hidden_size]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden_size] -> [N, vocab_size], the full vocabulary on every rank."""
        return self.lm_head.compute_logits(hidden)

    def load_weights(self, model_dir: str | Path) -> None:
        load_weights(self, model_dir)


class MistralForCausalLM(LlamaForCausalLM):
    pass  # Llama plus a sliding window, which comes from the config


class Qwen2ForCausalLM(LlamaForCausalLM):
    always_qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with q/k/v and gate/up fused in the checkpoint (tp_plan.py splits them per rank), a partial
    rotary factor and LongRoPE (rotary.py)."""
