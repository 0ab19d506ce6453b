"""Tensor-parallel building blocks of the Llama-family models."""

from tprun.worker.layers.attention import Attention
from tprun.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tprun.worker.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tprun.worker.layers.moe import FusedMoE
from tprun.worker.layers.norm import GemmaRMSNorm, RMSNorm
from tprun.worker.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk, rope_parameters

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "FusedMoE",
    "GemmaRMSNorm",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "ReplicatedLinear",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_rotary",
    "apply_rotary_qk",
    "rope_parameters",
]
