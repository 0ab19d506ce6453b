"""How each weight of a supported checkpoint is split across the tensor-parallel group.

This table is the whole parallel plan: the loader places every checkpoint tensor through it, and checks
that the module it lands in is the layer type that implements the split.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

from torch import nn

from tprun.worker.layers import (
    Attention,
    ColumnParallelLinear,
    FusedMoE,
    ParallelLMHead,
    ReplicatedLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Split(Enum):
    COLUMNS = "columns"  # output features split; each rank computes its slice, no communication
    ROWS = "rows"  # input features split; partial sums added by one all_reduce
    VOCAB = "vocab"  # vocabulary rows split (padded to a multiple of TP); all_reduce / all_gather
    REPLICATED = "replicated"  # every rank holds the whole tensor
    HEADS = "heads"  # one value per query head, split with the heads (attention sinks)
    # Every rank holds every expert; each expert's gate/up split by columns, down by rows (biases: gate/up
    # split, down replicated and added by rank 0); one all_reduce after experts + shared expert are summed.
    EXPERTS = "experts"


@dataclass(frozen=True)
class Placement:
    module: str  # our module the tensor loads into, in place of the checkpoint's module
    split: Split
    shard: str | int | None = None  # which part of a fused module (per expert: the part, with the expert id)
    param: str | None = None  # our parameter's name, where it differs from the checkpoint's
    fills: tuple | None = None  # the parts one checkpoint tensor fills when the checkpoint is fused too


# checkpoint module (trailing name)        our module                     split             fused part
TP_PLAN: dict[str, Placement] = {
    "embed_tokens":              Placement("embed_tokens",             Split.VOCAB),
    "self_attn.q_proj":          Placement("self_attn.qkv_proj",       Split.COLUMNS,    "q"),
    "self_attn.k_proj":          Placement("self_attn.qkv_proj",       Split.COLUMNS,    "k"),
    "self_attn.v_proj":          Placement("self_attn.qkv_proj",       Split.COLUMNS,    "v"),
    "self_attn.q_norm":          Placement("self_attn.q_norm",         Split.REPLICATED),
    "self_attn.k_norm":          Placement("self_attn.k_norm",         Split.REPLICATED),
    "self_attn.o_proj":          Placement("self_attn.o_proj",         Split.ROWS),
    "mlp.gate_proj":             Placement("mlp.gate_up_proj",         Split.COLUMNS,    0),
    "mlp.up_proj":               Placement("mlp.gate_up_proj",         Split.COLUMNS,    1),
    "mlp.down_proj":             Placement("mlp.down_proj",            Split.ROWS),
    "input_layernorm":           Placement("input_layernorm",          Split.REPLICATED),
    "post_attention_layernorm":  Placement("post_attention_layernorm", Split.REPLICATED),
    "norm":                      Placement("norm",                     Split.REPLICATED),
    "lm_head":                   Placement("lm_head",                  Split.VOCAB),
    # Phi-3: q/k/v and gate/up already fused in the checkpoint; each rank reads its rows of every part.
    "self_attn.qkv_proj":        Placement("self_attn.qkv_proj",       Split.COLUMNS,    "qkv",
                                           fills=("q", "k", "v")),
    "mlp.gate_up_proj":          Placement("mlp.gate_up_proj",         Split.COLUMNS,    "fused", fills=(0, 1)),
    # gpt-oss: attention sinks, one per query head.
    "self_attn":                 Placement("self_attn.attn",           Split.HEADS),
    # Gemma 2/3: norms around the MLP as well.
    "pre_feedforward_layernorm": Placement("pre_feedforward_layernorm", Split.REPLICATED),
    "post_feedforward_layernorm": Placement("post_feedforward_layernorm", Split.REPLICATED),
    # MoE routers: replicated, so every rank routes identically.
    "block_sparse_moe.gate":     Placement("mlp.gate",                 Split.REPLICATED),  # Mixtral
    "mlp.gate":                  Placement("mlp.gate",                 Split.REPLICATED),  # Qwen2/3-MoE
    "mlp.router":                Placement("mlp.router",               Split.REPLICATED),  # gpt-oss (+ bias)
    # Experts, one checkpoint tensor per expert (the expert id is taken out of the name: experts.<e>.w1).
    "block_sparse_moe.experts.w1": Placement("mlp.experts",            Split.EXPERTS,    "gate", "gate_up_proj"),
    "block_sparse_moe.experts.w3": Placement("mlp.experts",            Split.EXPERTS,    "up", "gate_up_proj"),
    "block_sparse_moe.experts.w2": Placement("mlp.experts",            Split.EXPERTS,    "down", "down_proj"),
    "experts.gate_proj":         Placement("experts",                  Split.EXPERTS,    "gate", "gate_up_proj"),
    "experts.up_proj":           Placement("experts",                  Split.EXPERTS,    "up", "gate_up_proj"),
    "experts.down_proj":         Placement("experts",                  Split.EXPERTS,    "down", "down_proj"),
    # Experts stacked [E, ...] (gpt-oss; transformers 5 saves): gate_up_proj, down_proj, their biases, and
    # gpt-oss MXFP4 gate_up_proj_blocks/_scales, down_proj_blocks/_scales (dequantised at load).
    "mlp.experts":               Placement("mlp.experts",              Split.EXPERTS),
    # Qwen2-MoE's shared expert: a dense MLP whose down projection skips its all_reduce (the MoE block
    # sums it with the experts first); its sigmoid gate is replicated.
    "shared_expert.gate_proj":   Placement("shared_expert.gate_up_proj", Split.COLUMNS,  0),
    "shared_expert.up_proj":     Placement("shared_expert.gate_up_proj", Split.COLUMNS,  1),
    "shared_expert.down_proj":   Placement("shared_expert.down_proj",  Split.ROWS),
    "mlp.shared_expert_gate":    Placement("mlp.shared_expert_gate",   Split.REPLICATED),
}  # fmt: skip

# Stacked expert weights stored as MXFP4 (gpt-oss): FP4 values packed two a byte, and one scale per 32.
MXFP4_SUFFIXES = ("_blocks", "_scales")

# Checkpoint tensors that are not weights (old checkpoints saved RoPE's buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# The layer type that implements each split.
SPLIT_LAYERS: dict[Split, tuple[type[nn.Module], ...]] = {
    Split.COLUMNS: (ColumnParallelLinear,),
    Split.ROWS: (RowParallelLinear,),
    Split.VOCAB: (VocabParallelEmbedding, ParallelLMHead),
    Split.REPLICATED: (RMSNorm, ReplicatedLinear),
    Split.HEADS: (Attention,),
    Split.EXPERTS: (FusedMoE,),
}


def place(checkpoint_name: str) -> tuple[str, Placement] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> ('model.layers.3.self_attn.qkv_proj.weight', plan entry)."""
    module_path, _, param_name = checkpoint_name.rpartition(".")
    parts = module_path.split(".")
    expert = _pop_expert_id(parts)
    mxfp4_part = None
    if param_name.endswith(MXFP4_SUFFIXES):  # gpt-oss MXFP4: gate_up_proj_blocks + _scales fill gate_up_proj
        param_name, mxfp4_part = param_name.rsplit("_", 1)
    for key, placement in TP_PLAN.items():
        key_parts = key.split(".")
        if parts[-len(key_parts) :] == key_parts:
            per_expert = placement.split is Split.EXPERTS and placement.shard is not None
            if per_expert != (expert is not None):
                return None
            if per_expert:
                placement = replace(placement, shard=(placement.shard, expert))
            if mxfp4_part is not None:
                if placement.split is not Split.EXPERTS or per_expert:
                    return None
                placement = replace(placement, shard=mxfp4_part)
            prefix = parts[: -len(key_parts)]
            return ".".join([*prefix, placement.module, placement.param or param_name]), placement
    return None


def _pop_expert_id(parts: list[str]) -> int | None:
    """'mlp.experts.5.gate_proj' -> parts without the '5', and 5."""
    for i in range(len(parts) - 1):
        if parts[i] == "experts" and parts[i + 1].isdigit():
            return int(parts.pop(i + 1))
    return None
