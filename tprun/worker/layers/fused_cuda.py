"""Fused elementwise kernels for the CUDA path (Triton): (residual add +) RMSNorm, RoPE on q and k,
SiLU-and-mul.

In PyTorch each of these is 5-10 kernels (RMSNorm alone: to(float32), pow, mean, add, rsqrt, mul,
to(dtype), mul), and at decode batch sizes every kernel is a few microseconds of launch-bound work: in a
bench-shape decode step they took more GPU time than the GEMMs (benchmarks/NOTES.md). Each kernel here
rounds where the PyTorch version rounds, so results match the CPU path to the last bit of each
intermediate except where noted.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_ok(x: torch.Tensor) -> bool:
    """Whether the fused kernels apply: a CUDA tensor of a dtype Triton computes exactly as PyTorch does."""
    return x.is_cuda and x.dtype in FUSED_DTYPES


# ------------------------------------------------------------------------------------------- RMSNorm
@triton.jit
def _rms_norm_kernel(X, W, Out, stride_xt, stride_xh, rows_per_t, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = row // rows_per_t
    h = row % rows_per_t
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + t.to(tl.int64) * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n
    y = (x * tl.rsqrt(var + eps)).to(Out.dtype.element_ty)  # to the input dtype, then scale: as transformers
    w = tl.load(W + offs, mask=mask)
    tl.store(Out + row.to(tl.int64) * n + offs, (w.to(tl.float32) * y.to(tl.float32)).to(Out.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, n] or [T, heads, n] (last dim contiguous, any row strides) -> contiguous, same shape."""
    n = x.shape[-1]
    assert x.stride(-1) == 1 and weight.dtype == x.dtype
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    if x.dim() == 2:
        rows_per_t, stride_t, stride_h = 1, x.stride(0), 0
    elif x.dim() == 3:
        rows_per_t, stride_t, stride_h = x.shape[1], x.stride(0), x.stride(1)
    else:
        raise ValueError(f"rms_norm takes [T, n] or [T, heads, n], got {tuple(x.shape)}")
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(x.shape[0] * rows_per_t,)](x, weight, out, stride_t, stride_h, rows_per_t, n, eps,
                                                  BLOCK=block, num_warps=4 if block >= 2048 else 1)
    return out


@triton.jit
def _add_rms_norm_kernel(X, R, W, Out, R_out, stride_x, stride_r, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    dt = Out.dtype.element_ty
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
    s = (x + r).to(dt)  # the residual stream, rounded as the PyTorch addition rounds it
    tl.store(R_out + row * n + offs, s, mask=mask)
    h = s.to(tl.float32)
    y = (h * tl.rsqrt(tl.sum(h * h, axis=0) / n + eps)).to(dt)
    w = tl.load(W + offs, mask=mask)
    tl.store(Out + row * n + offs, (w.to(tl.float32) * y.to(tl.float32)).to(dt), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) for [T, n] rows, in one kernel."""
    num_tokens, n = x.shape
    assert x.stride(-1) == 1 and residual.stride(-1) == 1 and residual.shape == x.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = triton.next_power_of_2(n)
        _add_rms_norm_kernel[(num_tokens,)](x, residual, weight, out, summed, x.stride(0), residual.stride(0), n,
                                            eps, BLOCK=block, num_warps=4 if block >= 2048 else 1)
    return out, summed


# ---------------------------------------------------------------------------------------------- RoPE
@triton.jit
def _rope_half(X, Out, cos1, cos2, sin1, sin2, t, stride_xt, stride_xh, num_heads,
               HALF: tl.constexpr, HEADS: tl.constexpr):
    offs_h = tl.arange(0, HEADS)
    offs_d = tl.arange(0, HALF)
    mask = (offs_h < num_heads)[:, None]
    src = X + t.to(tl.int64) * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dt = Out.dtype.element_ty
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the dtype as PyTorch does.
    o1 = (x1 * cos1).to(dt).to(tl.float32) + (-x2 * sin1).to(dt).to(tl.float32)
    o2 = (x2 * cos2).to(dt).to(tl.float32) + (x1 * sin2).to(dt).to(tl.float32)
    dst = Out + t.to(tl.int64) * num_heads * 2 * HALF + offs_h[:, None] * 2 * HALF + offs_d[None, :]
    tl.store(dst, o1.to(dt), mask=mask)
    tl.store(dst + HALF, o2.to(dt), mask=mask)


@triton.jit
def _rope_qk_kernel(Q, K, Cos, Sin, Q_out, K_out, stride_qt, stride_qh, stride_kt, stride_kh, stride_ct,
                    num_q_heads, num_k_heads, HALF: tl.constexpr, Q_HEADS: tl.constexpr,
                    K_HEADS: tl.constexpr):
    t = tl.program_id(0)
    offs_d = tl.arange(0, HALF)
    c = Cos + t.to(tl.int64) * stride_ct + offs_d
    s = Sin + t.to(tl.int64) * stride_ct + offs_d
    cos1, cos2 = tl.load(c)[None, :], tl.load(c + HALF)[None, :]
    sin1, sin2 = tl.load(s)[None, :], tl.load(s + HALF)[None, :]
    _rope_half(Q, Q_out, cos1, cos2, sin1, sin2, t, stride_qt, stride_qh, num_q_heads, HALF, Q_HEADS)
    _rope_half(K, K_out, cos1, cos2, sin1, sin2, t, stride_kt, stride_kh, num_k_heads, HALF, K_HEADS)


def rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, nh, hd], k [T, nkv, hd] (last dim contiguous), cos/sin [T, 1, hd] -> rotated, contiguous."""
    num_tokens, nh, hd = q.shape
    nkv = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and hd % 2 == 0
    cos2d, sin2d = cos.reshape(num_tokens, hd), sin.reshape(num_tokens, hd)
    assert cos2d.stride(-1) == 1 and sin2d.stride() == cos2d.stride()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if num_tokens:
        _rope_qk_kernel[(num_tokens,)](
            q, k, cos2d, sin2d, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            cos2d.stride(0), nh, nkv, HALF=hd // 2, Q_HEADS=triton.next_power_of_2(nh),
            K_HEADS=triton.next_power_of_2(nkv), num_warps=4,
        )
    return q_out, k_out


# -------------------------------------------------------------------------------------- SiLU and mul
@triton.jit
def _silu_and_mul_kernel(X, Out, stride_xt, n, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    row = X + t.to(tl.int64) * stride_xt
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n + offs, mask=mask, other=0.0)
    dt = Out.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dt)  # F.silu rounds to the dtype before the product
    tl.store(Out + t.to(tl.int64) * n + offs, (act.to(tl.float32) * up.to(tl.float32)).to(dt), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 * n] = [gate | up] -> silu(gate) * up, [T, n]."""
    num_tokens, two_n = x.shape
    n = two_n // 2
    assert x.stride(-1) == 1
    out = torch.empty(num_tokens, n, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = 1024
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(n, block))](x, out, x.stride(0), n, BLOCK=block,
                                                                  num_warps=4)
    return out
