"""Model construction: architecture name (config.json's `architectures`) -> tensor-parallel model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tprun.worker.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from tprun.worker.parallel import TPGroup

SUPPORTED_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(hf_config: Any) -> type[nn.Module]:
    architectures = getattr(hf_config, "architectures", None) or []
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    raise ValueError(
        f"unsupported model architecture {', '.join(architectures) or '(config.json names none)'}; "
        f"tprun supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(hf_config: Any, tp: TPGroup, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model with uninitialised weights, allocated directly on `device` in `dtype` (no float32 detour)."""
    cls = model_class(hf_config)
    with torch.device(device), _default_dtype(dtype):
        return cls(hf_config, tp).eval()


def load_model(
    model_dir: str | Path, hf_config: Any, tp: TPGroup, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    model = build_model(hf_config, tp, dtype, device)
    model.load_weights(model_dir)
    return model


def check_supported(hf_config: Any, tp_size: int) -> None:
    """The errors a rank can raise from config.json alone, before any rendezvous could hang."""
    from tprun.worker.parallel import divide

    model_class(hf_config)
    divide(hf_config.num_attention_heads, tp_size, "the model's num_attention_heads")
