"""Tensor-parallel building blocks of the Llama-family models."""

from tprun.worker.layers.attention import Attention
from tprun.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from tprun.worker.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tprun.worker.layers.norm import RMSNorm
from tprun.worker.layers.rotary import RotaryEmbedding, apply_rotary, apply_rotary_qk, rope_parameters

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RMSNorm",
    "RotaryEmbedding",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "apply_rotary",
    "apply_rotary_qk",
    "rope_parameters",
]
