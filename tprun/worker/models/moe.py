"""Mixture-of-Experts families on the Llama skeleton: Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss.

A model only says which layers' MLP is an MoE block and how it routes; the experts themselves (stacked
weights, loading, TP slicing, the kernel) are tprun/worker/layers/moe.py's FusedMoE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tprun.worker.layers import FusedMoE, ReplicatedLinear
from tprun.worker.layers.moe import clamped_swiglu, silu_and_mul, softmax_topk, topk_softmax
from tprun.worker.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from tprun.worker.parallel import TPGroup

# router logits [T, E] -> (topk_weights [T, k], topk_ids [T, k])
Routing = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SparseMoeBlock(nn.Module):
    """router -> experts (+ gated shared expert) -> one all_reduce of the summed partial results."""

    def __init__(
        self, router: ReplicatedLinear, experts: FusedMoE, routing: Routing, tp: TPGroup,
        shared_expert: LlamaMLP | None = None, shared_expert_gate: ReplicatedLinear | None = None,
        router_name: str = "gate",
    ):
        super().__init__()
        self.router_name = router_name  # the checkpoint's name for it ('gate'; gpt-oss: 'router')
        setattr(self, router_name, router)
        self.experts = experts
        self.routing = routing
        self.tp = tp
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.routing(getattr(self, self.router_name)(x))
        out = self.experts(x, topk_weights, topk_ids)
        if self.shared_expert is not None:  # Qwen2-MoE: sigmoid-gated, its partial sum joins the experts'
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)


class MixtralForCausalLM(LlamaForCausalLM):
    def make_mlp(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        k, e = cfg.num_experts_per_tok, cfg.num_local_experts
        return SparseMoeBlock(
            ReplicatedLinear(cfg.hidden_size, e, bias=False),
            FusedMoE(e, cfg.hidden_size, cfg.intermediate_size, tp, silu_and_mul, what="intermediate_size"),
            lambda logits: softmax_topk(logits, k, renormalize=True),
            tp,
        )


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True
    shared_expert = False

    @staticmethod
    def is_sparse(cfg: Any, layer_idx: int) -> bool:
        """transformers' rule: not in mlp_only_layers, and every decoder_sparse_step-th layer."""
        return (
            layer_idx not in (getattr(cfg, "mlp_only_layers", None) or [])
            and cfg.num_experts > 0
            and (layer_idx + 1) % cfg.decoder_sparse_step == 0
        )

    def make_mlp(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        if not self.is_sparse(cfg, layer_idx):
            return LlamaMLP(cfg, tp)
        k, e = cfg.num_experts_per_tok, cfg.num_experts
        shared = {}
        if self.shared_expert:
            shared = {
                "shared_expert": LlamaMLP(cfg, tp, cfg.shared_expert_intermediate_size,
                                          "shared_expert_intermediate_size", reduce_results=False),
                "shared_expert_gate": ReplicatedLinear(cfg.hidden_size, 1, bias=False),
            }
        return SparseMoeBlock(
            ReplicatedLinear(cfg.hidden_size, e, bias=False),
            FusedMoE(e, cfg.hidden_size, cfg.moe_intermediate_size, tp, silu_and_mul),
            lambda logits: softmax_topk(logits, k, renormalize=cfg.norm_topk_prob),
            tp,
            **shared,
        )

    @classmethod
    def tp_divisible(cls, cfg: Any) -> dict[str, int]:
        sizes = {"num_attention_heads": cfg.num_attention_heads}
        layers = range(cfg.num_hidden_layers)
        if any(cls.is_sparse(cfg, i) for i in layers):
            sizes["moe_intermediate_size"] = cfg.moe_intermediate_size
            if cls.shared_expert:
                sizes["shared_expert_intermediate_size"] = cfg.shared_expert_intermediate_size
        if not all(cls.is_sparse(cfg, i) for i in layers):
            sizes["intermediate_size"] = cfg.intermediate_size
        return sizes


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    shared_expert = True

    def qkv_bias(self, cfg: Any) -> bool:
        return getattr(cfg, "qkv_bias", True)


class GptOssForCausalLM(LlamaForCausalLM):
    def make_attention(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        return LlamaAttention(cfg, layer_idx, tp, self.qkv_bias(cfg), qk_norm=False, sinks=True)

    def make_mlp(self, cfg: Any, layer_idx: int, tp: TPGroup) -> nn.Module:
        k, e = cfg.num_experts_per_tok, cfg.num_local_experts
        # transformers before 5.2x has no swiglu_alpha in the config and uses gpt-oss's 1.702 and 7.0.
        act = clamped_swiglu(getattr(cfg, "swiglu_alpha", 1.702), getattr(cfg, "swiglu_limit", 7.0))
        return SparseMoeBlock(
            ReplicatedLinear(cfg.hidden_size, e, bias=True),
            FusedMoE(e, cfg.hidden_size, cfg.intermediate_size, tp, act, bias=True, layout="gpt_oss",
                     what="intermediate_size"),
            lambda logits: topk_softmax(logits, k),
            tp,
            router_name="router",
        )
