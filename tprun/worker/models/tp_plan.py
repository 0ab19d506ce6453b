"""How each weight of a Llama-family checkpoint is split across the tensor-parallel group.

This table is the whole parallel plan: the loader places every checkpoint tensor through it, and checks
that the module it lands in is the layer type that implements the split.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import nn

from tprun.worker.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Split(Enum):
    COLUMNS = "columns"  # output features split; each rank computes its slice, no communication
    ROWS = "rows"  # input features split; partial sums added by one all_reduce
    VOCAB = "vocab"  # vocabulary rows split (padded to a multiple of TP); all_reduce / all_gather
    REPLICATED = "replicated"  # every rank holds the whole tensor


@dataclass(frozen=True)
class Placement:
    module: str  # our module the tensor loads into, in place of the checkpoint's module
    split: Split
    shard: str | int | None = None  # which part of a fused module


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
}  # fmt: skip

# Checkpoint tensors that are not weights (old checkpoints saved RoPE's buffer).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# The layer type that implements each split.
SPLIT_LAYERS: dict[Split, tuple[type[nn.Module], ...]] = {
    Split.COLUMNS: (ColumnParallelLinear,),
    Split.ROWS: (RowParallelLinear,),
    Split.VOCAB: (VocabParallelEmbedding, ParallelLMHead),
    Split.REPLICATED: (RMSNorm,),
}


def place(checkpoint_name: str) -> tuple[str, Placement] | None:
    """'model.layers.3.self_attn.q_proj.weight' -> ('model.layers.3.self_attn.qkv_proj.weight', plan entry)."""
    module_path, _, param_name = checkpoint_name.rpartition(".")
    parts = module_path.split(".")
    for key, placement in TP_PLAN.items():
        key_parts = key.split(".")
        if parts[-len(key_parts) :] == key_parts:
            prefix = parts[: -len(key_parts)]
            return ".".join([*prefix, placement.module, param_name]), placement
    return None
