"""The fused Triton kernels of the CUDA path equal the PyTorch code they replace (CPU path), on fresh
random inputs, including the strided q/k/v views a fused qkv projection produces.

Runs on a CUDA device, or on the CPU in Triton's interpreter with TRITON_INTERPRET=1 (bfloat16 only on the
GPU: the interpreter has no bfloat16 arithmetic of its own).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.triton_support import DEVICE, skip_module_without_triton

skip_module_without_triton("the fused kernels")

from tprun.worker.layers import fused_cuda  # noqa: E402
from tprun.worker.layers.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal but for the last bit of a few elements (reduction order, exp/rsqrt approximations)."""
    eps = torch.finfo(ref.dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps)


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_pytorch_on_rows_and_strided_head_views(dtype):
    x = torch.randn(37, 1000, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(1000, device=DEVICE)).to(dtype)
    close(fused_cuda.rms_norm(x, w, 1e-6), reference_rms_norm(x, w, 1e-6))
    qkv = torch.randn(19, (6 + 2 * 2) * 64, device=DEVICE).to(dtype)  # q_norm on the q part of a qkv row
    q = qkv[:, : 6 * 64].view(19, 6, 64)
    wq = (1 + 0.1 * torch.randn(64, device=DEVICE)).to(dtype)
    close(fused_cuda.rms_norm(q, wq, 1e-5), reference_rms_norm(q, wq, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_returns_the_normed_sum_and_the_sum(dtype):
    x = torch.randn(23, 1000, device=DEVICE).to(dtype)
    residual = torch.randn(23, 1000, device=DEVICE).to(dtype)
    w = (1 + 0.1 * torch.randn(1000, device=DEVICE)).to(dtype)
    out, summed = fused_cuda.add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(summed, x + residual)
    close(out, reference_rms_norm(x + residual, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_qk_matches_apply_rotary_on_qkv_views(dtype):
    nh, nkv, hd, t = 12, 3, 64, 29  # head counts that are not powers of two (TP shards)
    qkv = torch.randn(t, (nh + 2 * nkv) * hd, device=DEVICE).to(dtype)
    q = qkv[:, : nh * hd].view(t, nh, hd)
    k = qkv[:, nh * hd : (nh + nkv) * hd].view(t, nkv, hd)
    positions = torch.randint(0, 4000, (t,), device=DEVICE)
    rope = RotaryEmbedding(hd, {"rope_type": "default", "rope_theta": 500000.0}).to(DEVICE)
    cos, sin = rope(positions, dtype)
    q_out, k_out = fused_cuda.rotary_qk(q, k, cos, sin)
    close(q_out, apply_rotary(q, cos, sin))
    close(k_out, apply_rotary(k, cos, sin))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_matches_pytorch(dtype):
    x = torch.randn(13, 2 * 3000, device=DEVICE).to(dtype)
    gate, up = x.chunk(2, dim=-1)
    close(fused_cuda.silu_and_mul(x), F.silu(gate) * up)
