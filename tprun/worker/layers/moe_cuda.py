"""Fused MoE experts on CUDA in Triton: tokens sorted by expert, then two grouped GEMMs (vLLM's fused_moe).

1. `moe_align_block_size`: the T * k (token, slot) pairs are grouped by expert (stable: within an expert in
   flat-index order, experts in index order), and each expert's segment is padded to BLOCK_M, all on the
   device. The buffers' sizes depend only on T, k, E and BLOCK_M, never on the routing, so a decode step
   with this layer can be captured in a CUDA graph; blocks past the routed total exit at once.
2. `_moe_gemm_kernel`, once for gate/up (x rows gathered by token, bias, activation fused: SiLU-and-mul or
   gpt-oss's clamped SwiGLU) into [T * k, I], once for down (bias, times the routing weight) into
   [T * k, H]. Every (token, slot) pair is written by exactly one program, and the k partial results are
   summed by a plain reduction afterwards: no atomics, so the result does not depend on timing.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

ACT_NONE, ACT_SILU, ACT_SWIGLU_CLAMPED = 0, 1, 2


# --------------------------------------------------------------------------------------------- layout
@triton.jit
def _align_kernel(Ids, Sorted, ExpertIds, NumPost, numel, NUM_EXPERTS: tl.constexpr, E_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
    """One program per expert e: count every expert's pairs (each program recounts; T * k is small), place
    e's segment after the padded segments of experts < e, write its pairs in flat order, pad with numel."""
    e = tl.program_id(0)
    bins = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, numel, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(Ids + offs, mask=offs < numel, other=NUM_EXPERTS).to(tl.int32)  # spare bin E: padding
        counts += tl.histogram(ids, E_PAD)
    counts = tl.where(bins < NUM_EXPERTS, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    offset = tl.sum(tl.where(bins < e, padded, 0))
    mine = tl.sum(tl.where(bins == e, counts, 0))
    mine_padded = tl.sum(tl.where(bins == e, padded, 0))
    seen = tl.full([], 0, tl.int32)
    for c0 in range(0, numel, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(Ids + offs, mask=offs < numel, other=NUM_EXPERTS)
        hit = (ids == e).to(tl.int32)
        rank = seen + tl.cumsum(hit, 0) - 1
        tl.store(Sorted + offset + rank, offs, mask=hit > 0)
        seen += tl.sum(hit)
    pad = tl.arange(0, BLOCK_M)
    tl.store(Sorted + offset + mine + pad, numel + tl.zeros([BLOCK_M], tl.int32), mask=mine + pad < mine_padded)
    for b in range(0, mine_padded // BLOCK_M):
        tl.store(ExpertIds + offset // BLOCK_M + b, e)
    if e == 0:
        tl.store(NumPost, tl.sum(padded))


def max_padded_pairs(numel: int, num_experts: int, block_m: int) -> int:
    """Room for every expert's padded segment: at most min(E, numel) experts have pairs, each padded by
    fewer than block_m."""
    return numel + min(num_experts, numel) * (block_m - 1)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] -> (sorted_ids [P]: flat pair indices grouped by expert, padding = T * k;
    expert_ids [P // block_m]: the expert of each block; num_post_padded [1]: the blocks' used length).
    Entries past num_post_padded are left unwritten: nothing reads them."""
    numel = topk_ids.numel()
    size = max_padded_pairs(numel, num_experts, block_m)
    sorted_ids = torch.empty(size, dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.empty(triton.cdiv(size, block_m), dtype=torch.int32, device=topk_ids.device)
    num_post = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    _align_kernel[(num_experts,)](
        topk_ids.reshape(-1), sorted_ids, expert_ids, num_post, numel, NUM_EXPERTS=num_experts,
        E_PAD=triton.next_power_of_2(num_experts + 1), BLOCK_M=block_m, CHUNK=256,
    )
    return sorted_ids, expert_ids, num_post


def moe_align_reference(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[list[int], list[int], int]:
    """The same layout in plain Python (the tests' reference): (sorted_ids, expert_ids, num_post_padded),
    each list only as long as the used part."""
    flat = topk_ids.reshape(-1).tolist()
    sorted_ids: list[int] = []
    expert_ids: list[int] = []
    for e in range(num_experts):
        pairs = [i for i, x in enumerate(flat) if x == e]
        if not pairs:
            continue
        blocks = -(-len(pairs) // block_m)
        sorted_ids += pairs + [len(flat)] * (blocks * block_m - len(pairs))
        expert_ids += [e] * blocks
    return sorted_ids, expert_ids, len(sorted_ids)


# ---------------------------------------------------------------------------------------------- GEMM
@triton.jit
def _moe_gemm_kernel(A, B, Bias, C, TopkW, Sorted, ExpertIds, NumPost, N, K, num_valid, num_m,
                     stride_am, stride_be, stride_bn, stride_bias_e, stride_cm, alpha, limit,
                     A_ROWS_DIV: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """C[pair, n] = act(A[pair // A_ROWS_DIV] @ B[e].T + bias[e]) (* routing weight), for the pairs of
    block pid_m, which all route to expert e. With a gated ACT, B's rows [0, N) are the gate and [N, 2N)
    the up projection, and C has N columns."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row blocks share each weight tile while it is in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    if pid_m * BLOCK_M >= tl.load(NumPost):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(Sorted + offs_m)
    valid = pairs < num_valid
    e = tl.load(ExpertIds + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = (pairs // A_ROWS_DIV).to(tl.int64) * stride_am
    b_base = B + e * stride_be + offs_n[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if ACT != 0:
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(A + a_rows[:, None] + kk[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if ACT != 0:
            b_up = tl.load(b_base + N * stride_bn + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        bias_base = Bias + e * stride_bias_e
        acc += tl.load(bias_base + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if ACT != 0:
            acc_up += tl.load(bias_base + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # silu(gate) * up
        acc = acc / (1.0 + tl.exp(-acc)) * acc_up
    elif ACT == 2:  # gpt-oss: gate clamped above, up both ways, gate * sigmoid(alpha * gate) * (up + 1)
        gate = tl.minimum(acc, limit)
        up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        acc = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    if MUL_WEIGHT:
        acc *= tl.load(TopkW + pairs, mask=valid, other=0.0).to(tl.float32)[:, None]
    c = C + pairs.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(C.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])


# Tile sizes by pairs per expert (T * k / E). Few (decode) want small M tiles and many weight tiles in
# flight, since each weight tile is read once per M block; many (prefill) want larger M tiles that reuse
# each weight tile. The "down" entry overrides the down GEMM's tiles (BLOCK_M stays: one layout). Tuned on
# an H200 at the qwen3-30b-a3b expert shapes (benchmarks/moe_kernels.py, benchmarks/NOTES.md); the spread
# between candidates was within 10 %. TPRUN_MOE_CONFIGS may name a JSON file of the same form.
_DOWN = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
CONFIGS: dict[str, dict] = {
    "tiny": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 3,
             "down": _DOWN | {"BLOCK_N": 32}},
    "small": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1, "num_warps": 4, "num_stages": 3,
              "down": _DOWN},
    "decode": {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4,
               "down": _DOWN},
    "prefill": {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3,
                "down": {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}},
}


def regime(num_pairs: int, num_experts: int) -> str:
    per_expert = num_pairs / num_experts
    return "tiny" if per_expert <= 1 else "small" if per_expert <= 8 else "decode" if per_expert <= 32 else "prefill"


@functools.cache
def _configs() -> dict[str, dict]:
    path = os.environ.get("TPRUN_MOE_CONFIGS")
    if not path:
        return CONFIGS
    try:
        tuned = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"TPRUN_MOE_CONFIGS={path}: cannot read a JSON table of MoE tile sizes ({e})") from e
    return CONFIGS | {k: v for k, v in tuned.items() if k in CONFIGS}


def _config(num_pairs: int, num_experts: int) -> tuple[dict, dict]:
    """(gate/up GEMM config, down GEMM config) for this many (token, slot) pairs."""
    cfg = dict(_configs()[regime(num_pairs, num_experts)])
    down_overrides = cfg.pop("down", {})
    return cfg, cfg | down_overrides | {"BLOCK_M": cfg["BLOCK_M"]}


def _gemm(a, w, bias, out, topk_weights, layout, block, num_valid, a_rows_div, act, mul_weight, alpha, limit):
    n = out.shape[1]
    sorted_ids, expert_ids, num_post = layout
    cfg = dict(block)
    cfg["BLOCK_N"] = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(n)))
    cfg["BLOCK_K"] = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(a.shape[1])))
    if a.element_size() == 4:  # float32 tiles take twice the shared memory per stage
        cfg["BLOCK_K"], cfg["num_stages"] = min(cfg["BLOCK_K"], 64), min(cfg["num_stages"], 2)
    grid = (expert_ids.shape[0] * triton.cdiv(n, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, w, bias if bias is not None else w, out, topk_weights, sorted_ids, expert_ids, num_post,
        n, a.shape[1], num_valid, expert_ids.shape[0], a.stride(0), w.stride(0), w.stride(1),
        bias.stride(0) if bias is not None else 0, out.stride(0), alpha, limit,
        A_ROWS_DIV=a_rows_div, ACT=act, HAS_BIAS=bias is not None, MUL_WEIGHT=mul_weight,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", **cfg,
    )


def triton_fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor, act: int, b13: torch.Tensor | None = None,
                         b2: torch.Tensor | None = None, alpha: float = 1.0, limit: float = 0.0) -> torch.Tensor:
    """fused_experts' contract (tprun/worker/layers/moe.py) for a gated activation `act`."""
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    k = topk_ids.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    assert act in (ACT_SILU, ACT_SWIGLU_CLAMPED)
    x = x.contiguous()
    w13, w2 = _last_dim_contiguous(w13), _last_dim_contiguous(w2)
    numel = num_tokens * k
    cfg, cfg_down = _config(numel, num_experts)
    layout = moe_align_block_size(topk_ids, num_experts, cfg["BLOCK_M"])
    weights = topk_weights.reshape(-1).contiguous()
    inter = torch.empty(numel, two_i // 2, dtype=x.dtype, device=x.device)
    _gemm(x, w13, b13, inter, weights, layout, cfg, numel, k, act, False, alpha, limit)
    out = torch.empty(numel, hidden, dtype=x.dtype, device=x.device)
    _gemm(inter, w2, b2, out, weights, layout, cfg_down, numel, 1, ACT_NONE, True, alpha, limit)
    return out.view(num_tokens, k, hidden).sum(dim=1)


def _last_dim_contiguous(w: torch.Tensor) -> torch.Tensor:
    return w if w.stride(-1) == 1 else w.contiguous()
