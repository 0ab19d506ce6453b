"""Model construction: architecture name (config.json's `architectures`) -> tensor-parallel model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tprun.worker.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from tprun.worker.models.llama import (
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)
from tprun.worker.models.moe import (
    GptOssForCausalLM,
    MixtralForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
)
from tprun.worker.parallel import TPGroup

SUPPORTED_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
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

    cls = model_class(hf_config)
    _check_quantization(hf_config, cls)
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (an embedding model) is not supported; tprun generates")
    for what, size in cls.tp_divisible(hf_config).items():
        divide(size, tp_size, f"the model's {what}")
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads >= tp_size:
        divide(kv_heads, tp_size, "the model's num_key_value_heads")
    elif tp_size % kv_heads:
        raise ValueError(
            f"num_key_value_heads ({kv_heads}) is smaller than the tensor-parallel size ({tp_size}) and does "
            f"not divide it, so KV heads cannot be replicated evenly; choose a tensor-parallel size that "
            f"divides {kv_heads} or is a multiple of it"
        )


def _check_quantization(hf_config: Any, cls: type[nn.Module]) -> None:
    quant = getattr(hf_config, "quantization_config", None)
    if not quant:
        return
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = getattr(method, "value", method)  # an enum in transformers' config classes
    if method == "mxfp4" and cls is GptOssForCausalLM:
        return  # its experts are dequantised at load (tprun/worker/layers/moe.py)
    raise ValueError(
        f"{method!s} quantized checkpoints are not supported for {cls.__name__}; tprun loads bf16/fp16/fp32 "
        f"checkpoints (and gpt-oss's MXFP4 experts, which it dequantises)"
    )
