"""Mixture-of-Experts: one layer type owns every expert's weights as stacked tensors [E, ...] (vLLM's FusedMoE).

Tensor parallelism as vLLM's FusedMoE does by default: every rank holds every expert, each expert's
gate/up split by columns and its down projection by rows, exactly like a dense MLP. The router is
replicated, so every rank picks the same experts, and the layer returns this rank's partial sum: the MoE
block adds the shared expert's partial sum and all_reduces once.

The expert computation is behind one function, `fused_experts`; on the CPU it loops over the experts that
have tokens (in expert order, as transformers' eager experts do, so float64 results agree with it); on
CUDA it runs the Triton grouped GEMMs of tprun/worker/layers/moe_cuda.py (no host sync: graph-capturable).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tprun.worker.layers.sharding import CheckpointTensor, NarrowedTensor, new_param
from tprun.worker.parallel import TPGroup, divide

# Activation of the gate/up halves [N, 2 * I_local] -> [N, I_local].
Activation = Callable[[torch.Tensor], torch.Tensor]


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss: gate clamped above, up clamped both ways, gate * sigmoid(alpha * gate) * (up + 1). A value
    (not a closure) so that the CUDA kernel can recognise it and fuse it with its parameters."""

    alpha: float
    limit: float

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def clamped_swiglu(alpha: float, limit: float) -> Activation:
    return ClampedSwiGLU(alpha, limit)


def topk_by_index(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest scores per row, ties broken by the lower expert index (a stable sort), so the choice
    depends only on the values and is the same on every rank and every run."""
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[:, :k], indices[:, :k]


def softmax_topk(router_logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral / Qwen-MoE routing: softmax over all experts in float32, top k, optionally renormalised,
    weights in the activations' dtype (the rounding of transformers' routers)."""
    probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = topk_by_index(probs, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def topk_softmax(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss routing: top k logits, softmax over those k."""
    values, ids = topk_by_index(router_logits, k)
    return F.softmax(values, dim=-1, dtype=values.dtype), ids


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    activation: Activation, b13: torch.Tensor | None = None, b2: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) -> [T, hidden].

    x [T, H]; w13 [E, 2 * I, H] (gate rows, then up rows); w2 [E, H, I]; b13 [E, 2 * I], b2 [E, H] or None.
    On CUDA, for the activations the kernel fuses (SiLU-and-mul, gpt-oss's clamped SwiGLU), the Triton
    grouped GEMMs (moe_cuda.py). Any other activation falls back to torch: the loop over experts, or, while
    a CUDA graph is being captured (no host sync allowed), every expert on every token with zero weights
    for the unrouted ones (correct, but E / k times the FLOPs).
    """
    if x.is_cuda:
        act = _kernel_activation(activation)
        if act is not None:
            from tprun.worker.layers import moe_cuda

            alpha, limit = (activation.alpha, activation.limit) if isinstance(activation, ClampedSwiGLU) else (1.0, 0.0)
            return moe_cuda.triton_fused_experts(x, w13, w2, topk_weights, topk_ids, act, b13, b2, alpha, limit)
        if torch.cuda.is_current_stream_capturing():
            return _dense_experts(x, w13, w2, topk_weights, topk_ids, activation, b13, b2)
    return _looped_experts(x, w13, w2, topk_weights, topk_ids, activation, b13, b2)


def _kernel_activation(activation: Activation) -> int | None:
    """The Triton kernel's code for an activation it fuses, or None."""
    from tprun.worker.layers.moe_cuda import ACT_SILU, ACT_SWIGLU_CLAMPED

    if activation is silu_and_mul:
        return ACT_SILU
    if isinstance(activation, ClampedSwiGLU):
        return ACT_SWIGLU_CLAMPED
    return None


def _looped_experts(x, w13, w2, topk_weights, topk_ids, activation, b13, b2) -> torch.Tensor:
    out = torch.zeros_like(x)
    k = topk_ids.shape[1]
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tokens, weights = order // k, topk_weights.flatten()[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tok = tokens[start : start + n]
        h = activation(F.linear(x[tok], w13[e], None if b13 is None else b13[e]))
        y = F.linear(h, w2[e], None if b2 is None else b2[e])
        out.index_add_(0, tok, y * weights[start : start + n, None])
        start += n
    return out


def _dense_experts(x, w13, w2, topk_weights, topk_ids, activation, b13, b2) -> torch.Tensor:
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        weight = (topk_weights * (topk_ids == e)).sum(dim=-1, keepdim=True)
        h = activation(F.linear(x, w13[e], None if b13 is None else b13[e]))
        out += F.linear(h, w2[e], None if b2 is None else b2[e]) * weight
    return out


class FusedMoE(nn.Module):
    """The experts of one MoE layer, split over TP; forward returns this rank's partial sum (not reduced).

    Checkpoint layouts it loads (`layout`):
      "per_expert": one tensor per expert and projection (Mixtral w1/w3/w2, Qwen gate/up/down_proj), or
                    transformers 5's stacked gate_up_proj [E, 2I, H] and down_proj [E, H, I];
      "gpt_oss":    gate_up_proj [E, H, 2I] with gate and up interleaved (column 2j gate, 2j+1 up),
                    down_proj [E, I, H], and biases gate_up_proj_bias [E, 2I], down_proj_bias [E, H];
                    or the weights in MXFP4 (gate_up_proj_blocks [E, 2I, H/32, 16] + _scales [E, 2I, H/32],
                    down_proj_blocks [E, H, I/32, 16] + _scales), dequantised at load by transformers'
                    convert_moe_packed_tensors, each rank reading and dequantising its rows only.
    """

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, tp: TPGroup, activation: Activation,
        *, bias: bool = False, layout: str = "per_expert", what: str = "moe_intermediate_size",
    ):
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.i_local = divide(intermediate_size, tp.size, what)
        self.activation = activation
        self.layout = layout
        self.gate_up_proj = new_param(num_experts, 2 * self.i_local, hidden_size)
        self.down_proj = new_param(num_experts, hidden_size, self.i_local)
        self.gate_up_proj_bias = new_param(num_experts, 2 * self.i_local) if bias else None
        self.down_proj_bias = new_param(num_experts, hidden_size) if bias else None
        self._mxfp4_pending: dict[str, dict[str, torch.Tensor]] = {}  # param -> blocks/scales read so far

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        # The down bias is added by rank 0 only, so the all_reduce adds it once per routed expert.
        b2 = self.down_proj_bias if self.tp.rank == 0 else None
        return fused_experts(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids, self.activation,
                             self.gate_up_proj_bias, b2)

    # -- loading ---------------------------------------------------------------------------------
    def expected_shards(self, param_name: str) -> list[set]:
        """The sets of shard ids that fill a parameter: per expert and part, or one stacked tensor."""
        stacked = {None}
        if param_name.endswith("_bias"):
            return [stacked]
        if self.layout == "gpt_oss":
            return [stacked, {"blocks", "scales"}]
        parts = ("gate", "up") if param_name == "gate_up_proj" else ("down",)
        return [{(p, e) for p in parts for e in range(self.num_experts)}, stacked]

    def weight_loader(
        self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: tuple[str, int] | str | None
    ) -> None:
        name = next(n for n, p in self.named_parameters() if p is param)
        if shard_id in ("blocks", "scales"):
            self._load_mxfp4(name, param.data, loaded, shard_id)
        elif shard_id is not None:
            part, e = shard_id
            self._load_expert(param.data[e], loaded, part)
        elif self.layout == "gpt_oss":
            self._load_gpt_oss(name, param.data, loaded)
        else:  # transformers 5's stacked tensors: gate_up [E, 2I, H], down [E, H, I]
            for e in range(self.num_experts):
                expert = _ExpertView(loaded, e, self.num_experts)
                if name == "gate_up_proj":
                    self._load_expert(param.data[e], NarrowedTensor(expert, 0, 0, self.intermediate_size), "gate")
                    self._load_expert(param.data[e], NarrowedTensor(expert, 0, self.intermediate_size,
                                                                    self.intermediate_size), "up")
                else:
                    self._load_expert(param.data[e], expert, "down")

    def _load_expert(self, dst: torch.Tensor, loaded: CheckpointTensor, part: str) -> None:
        """One expert's gate [I, H] / up [I, H] (rows split) or down [H, I] (columns split)."""
        n, r = self.i_local, self.tp.rank
        full_i, h = self.intermediate_size, self.hidden_size
        if part == "down":
            _check_shape(loaded, (h, full_i))
            dst.copy_(loaded[:, r * n : (r + 1) * n])
        else:
            _check_shape(loaded, (full_i, h))
            offset = 0 if part == "gate" else n
            dst[offset : offset + n].copy_(loaded[r * n : (r + 1) * n, :])

    def _load_gpt_oss(self, name: str, dst: torch.Tensor, loaded: CheckpointTensor) -> None:
        n, r = self.i_local, self.tp.rank
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        if name == "gate_up_proj":  # [E, H, 2I] interleaved: this rank's columns are one contiguous block
            _check_shape(loaded, (e, h, 2 * i))
            block = loaded[:, :, 2 * r * n : 2 * (r + 1) * n]
            dst.copy_(torch.cat((block[..., ::2], block[..., 1::2]), dim=-1).transpose(1, 2))
        elif name == "gate_up_proj_bias":
            _check_shape(loaded, (e, 2 * i))
            block = loaded[:, 2 * r * n : 2 * (r + 1) * n]
            dst.copy_(torch.cat((block[..., ::2], block[..., 1::2]), dim=-1))
        elif name == "down_proj":  # [E, I, H]: rows split
            _check_shape(loaded, (e, i, h))
            dst.copy_(loaded[:, r * n : (r + 1) * n, :].transpose(1, 2))
        else:  # down_proj_bias [E, H], replicated
            _check_shape(loaded, (e, h))
            dst.copy_(loaded[:, :])


    def _load_mxfp4(self, name: str, dst: torch.Tensor, loaded: CheckpointTensor, part: str) -> None:
        """Read this rank's rows of the packed blocks or scales; once both are in, dequantise them."""
        n, r = self.i_local, self.tp.rank
        e, i, h = self.num_experts, self.intermediate_size, self.hidden_size
        in_features = h if name == "gate_up_proj" else i
        groups = in_features // 32
        expected = (e, 2 * i if name == "gate_up_proj" else h, groups) + ((16,) if part == "blocks" else ())
        _check_shape(loaded, expected)
        if name == "gate_up_proj":  # output rows 2j (gate) and 2j+1 (up): this rank's rows are contiguous
            rows = loaded[:, 2 * r * n : 2 * (r + 1) * n]
        elif n % 32 == 0:  # down: input features are packed; whole groups of 32 belong to this rank
            rows = loaded[:, :, r * n // 32 : (r + 1) * n // 32]
        else:
            rows = loaded[:, :, :]
        pending = self._mxfp4_pending.setdefault(name, {})
        pending[part] = rows
        if len(pending) < 2:
            return
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        # -> [E, in_features, out_features], transformers' (and the bf16 checkpoint's) layout
        w = convert_moe_packed_tensors(pending["blocks"], pending["scales"], dtype=dst.dtype)
        del self._mxfp4_pending[name]
        if name == "gate_up_proj":
            dst.copy_(torch.cat((w[..., ::2], w[..., 1::2]), dim=-1).transpose(1, 2))
        else:
            w = w if n % 32 == 0 else w[:, r * n : (r + 1) * n]
            dst.copy_(w.transpose(1, 2))


class _ExpertView:
    """Expert e of a stacked [E, ...] checkpoint tensor, read lazily."""

    def __init__(self, loaded: CheckpointTensor, e: int, num_experts: int):
        if len(loaded.shape) != 3 or loaded.shape[0] != num_experts:
            raise ValueError(f"shape {tuple(loaded.shape)} is not [{num_experts} experts, ..., ...]")
        self._loaded, self._e = loaded, e
        self.shape = tuple(loaded.shape[1:])

    def __getitem__(self, index: tuple[slice, ...]) -> torch.Tensor:
        return self._loaded[(slice(self._e, self._e + 1), *index)][0]


def _check_shape(loaded: CheckpointTensor, expected: tuple[int, ...]) -> None:
    if tuple(loaded.shape) != expected:
        raise ValueError(f"shape {tuple(loaded.shape)} differs from the {expected} that the model config implies")
