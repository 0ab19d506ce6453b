"""The Triton fused-MoE path against the float64 torch experts loop, on fresh random inputs each run.

Runs on a CUDA device; without one it skips, unless TRITON_INTERPRET=1 with triton installed (Triton's CPU
interpreter: slow, but it checks the layout and the indexing anywhere). The torch loop it is compared with
is the CPU path, itself equal to transformers' experts in float64 (tests/test_models.py).
"""

from __future__ import annotations

import secrets

import pytest
import torch

from tests.triton_support import DEVICE, skip_module_without_triton

skip_module_without_triton("the Triton MoE kernels")
pytestmark = pytest.mark.gpu

from tprun.worker.layers import moe  # noqa: E402
from tprun.worker.layers import moe_cuda as mc  # noqa: E402

# Relative L2 error allowed: bf16/fp16 operands and a bf16/fp16 intermediate (METHOD.md's 1e-3 .. 1e-2),
# float32 with IEEE dots.
TOL = {torch.bfloat16: 1e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


def random_routing(num_tokens: int, num_experts: int, k: int, gen: torch.Generator, skew: bool = False):
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if skew:  # most tokens to a few experts, many experts idle: uneven segments and empty ones
        logits[:, : num_experts // 4] += 4.0
    weights, ids = moe.softmax_topk(logits, k, renormalize=True)
    return weights, ids


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("num_tokens,num_experts,k", [(1, 8, 2), (3, 5, 2), (257, 128, 8), (700, 60, 4)])
def test_align_groups_pairs_by_expert_stably_and_pads_to_the_block(num_tokens, num_experts, k, block_m):
    gen, seed = fresh_generator()
    _, ids = random_routing(num_tokens, num_experts, k, gen, skew=num_tokens > 100)
    sorted_ids, expert_ids, num_post = mc.moe_align_block_size(ids.to(DEVICE), num_experts, block_m)
    want_sorted, want_experts, want_total = mc.moe_align_reference(ids, num_experts, block_m)
    total = int(num_post.item())
    assert total == want_total, f"seed {seed}"
    assert total <= sorted_ids.numel() == mc.max_padded_pairs(ids.numel(), num_experts, block_m)
    assert sorted_ids[:total].tolist() == want_sorted, f"seed {seed}"
    assert expert_ids[: total // block_m].tolist() == want_experts, f"seed {seed}"


def reference(x, w13, w2, weights, ids, act, b13, b2) -> torch.Tensor:
    f64 = [t.double().cpu() if t is not None else None for t in (x, w13, w2, weights, b13, b2)]
    x, w13, w2, weights, b13, b2 = f64
    return moe._looped_experts(x, w13, w2, weights, ids.cpu(), act, b13, b2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double().cpu()
    assert not out.isnan().any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm()).item()


def run_fused(x, w13, w2, weights, ids, act, b13, b2) -> torch.Tensor:
    """Through fused_experts' CUDA dispatch on a GPU; in the interpreter (CPU tensors) the kernel directly."""
    if x.is_cuda:
        return moe.fused_experts(x, w13, w2, weights, ids, act, b13, b2)
    alpha, limit = (act.alpha, act.limit) if isinstance(act, moe.ClampedSwiGLU) else (1.0, 0.0)
    return mc.triton_fused_experts(x, w13, w2, weights, ids, moe._kernel_activation(act), b13, b2, alpha, limit)


CASES = [  # (tokens, experts, k, hidden, intermediate): decode-sized, odd sizes (masked tails), prefill-sized
    (1, 8, 2, 64, 32), (5, 5, 2, 64, 48), (40, 16, 4, 128, 96), (600, 16, 4, 256, 128),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("activation", ["silu", "clamped_swiglu_bias"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "t{}e{}k{}h{}i{}".format(*c))
def test_fused_experts_match_the_float64_loop(case, activation, dtype):
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's CPU interpreter computes bfloat16 dots wrongly; bfloat16 runs on the GPU")
    gen, seed = fresh_generator()
    t, e, k, h, i = case
    x = torch.randn(t, h, generator=gen)
    w13 = torch.randn(e, 2 * i, h, generator=gen) * h**-0.5
    w2 = torch.randn(e, h, i, generator=gen) * i**-0.5
    weights, ids = random_routing(t, e, k, gen, skew=t > 100)
    bias = activation.endswith("bias")
    b13 = torch.randn(e, 2 * i, generator=gen) if bias else None
    b2 = torch.randn(e, h, generator=gen) if bias else None
    act = moe.silu_and_mul if activation == "silu" else moe.clamped_swiglu(1.702, 7.0)
    dev = [z.to(DEVICE, dtype) if z is not None else None for z in (x, w13, w2, weights, b13, b2)]
    out = run_fused(*dev[:4], ids.to(DEVICE), act, *dev[4:])
    assert out.shape == x.shape and out.dtype == dtype
    ref = reference(*dev[:4], ids, act, *dev[4:])
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"relative error {err:.2e} (seed {seed})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_fused_experts_replayed_from_a_cuda_graph_follow_new_routing():
    """The qwen3-30b-a3b expert shapes at decode batch 64: a captured step replays correctly for routings
    it was not captured with (segment sizes, empty experts and the padded total all change)."""
    gen, seed = fresh_generator()
    t, e, k, h, i = 64, 128, 8, 2048, 768
    dt = torch.bfloat16
    x = torch.randn(t, h, generator=gen).to("cuda", dt)
    w13 = (torch.randn(e, 2 * i, h, device="cuda") * h**-0.5).to(dt)
    w2 = (torch.randn(e, h, i, device="cuda") * i**-0.5).to(dt)
    weights, ids = (z.cuda() for z in random_routing(t, e, k, gen))
    weights = weights.to(dt)
    out = torch.empty_like(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        out.copy_(moe.fused_experts(x, w13, w2, weights, ids, moe.silu_and_mul))
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(moe.fused_experts(x, w13, w2, weights, ids, moe.silu_and_mul))
    for skew in (False, True):
        new_w, new_ids = random_routing(t, e, k, gen, skew=skew)
        x.copy_(torch.randn(t, h, generator=gen).to("cuda", dt))
        weights.copy_(new_w.to(dt))
        ids.copy_(new_ids)
        out.fill_(float("nan"))
        graph.replay()
        ref = moe._looped_experts(x.double(), w13.double(), w2.double(), weights.double(), ids,
                                  moe.silu_and_mul, None, None)
        err = rel_err(out, ref.cpu())
        assert err < TOL[dt], f"skew={skew}: relative error {err:.2e} (seed {seed})"
