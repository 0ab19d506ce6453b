"""Decode-step kernels on the card at hand, each against its HBM bound: the paged decode attention over cache
layouts, block sizes and launch configs, and the decode GEMMs of the bench shapes, cuBLAS against a Triton
GEMM shaped for few rows (below: each program owns a narrow band of output features for all rows of x, no
split over K, a deep pipeline) over its configs. Picks what the engine uses (NOTES.md: the skinny GEMM was
within a few % of cuBLAS, so the engine keeps cuBLAS).

Layouts: "tok" is [num_blocks, block_size, num_kv_heads, head_dim] (a token's heads side by side); "head"
is [num_blocks, num_kv_heads, block_size, head_dim] (one head's block contiguous), passed to the kernels as
a permuted view, so the same strided kernels read both.

    python benchmarks/decode_kernels.py [--only attention|gemm] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import copy_bandwidth, graph_us, matmul_rate

from tprun.worker.layers import attention_cuda as ac

DEV = "cuda"
DT = torch.bfloat16
ROWS: list[dict] = []


@triton.jit
def _skinny_gemm_kernel(X, W, Bias, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def skinny_gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 32,
                block_k: int = 256, num_warps: int = 4, num_stages: int = 4, block_m: int | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ bias [N]) -> [M, N] in x's dtype; x and w row-major along K."""
    m, k = x.shape
    n = w.shape[0]
    assert w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    y = torch.empty(m, n, dtype=x.dtype, device=x.device) if out is None else out
    block_m = block_m or max(16, min(64, triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _skinny_gemm_kernel[grid](
        x, w, bias if bias is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, HAS_BIAS=bias is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def us(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def record(kind: str, case: str, impl: str, t_us: float, nbytes: float, bw: float, **extra) -> None:
    row = {"kind": kind, "case": case, "impl": impl, "us": t_us, "TBps": nbytes / t_us / 1e6,
           "bw_pct": 100 * nbytes / t_us / 1e-6 / bw, **extra}
    ROWS.append(row)
    print(f"{kind:5s} {case:34s} {impl:34s} {t_us:9.1f} us {row['TBps']:6.2f} TB/s {row['bw_pct']:5.1f} %",
          flush=True)


def paged(lens: list[int], nkv: int, hd: int, block: int, layout: str):
    nblocks = [-(-n // block) for n in lens]
    total = sum(nblocks)
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    tables = torch.zeros((len(lens), max(nblocks) + 8), dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(nblocks):
        tables[b, :n] = perm[at:at + n]
        at += n
    if layout == "tok":
        k = torch.randn(total, block, nkv, hd, device=DEV, dtype=DT)
        v = torch.randn_like(k)
    else:
        k = torch.randn(total, nkv, block, hd, device=DEV, dtype=DT).permute(0, 2, 1, 3)
        v = torch.randn(total, nkv, block, hd, device=DEV, dtype=DT).permute(0, 2, 1, 3)
    return k, v, tables


def attention(bw: float) -> None:
    cases = [("llama3-8b", 32, 8, 256, 512, 1024), ("llama3-8b", 32, 8, 64, 1024, 2048),
             ("llama3-8b", 32, 8, 1, 1024, 1024), ("qwen3-0.6b", 16, 8, 256, 512, 1024)]
    configs = [(512, 64, 4, 2), (512, 64, 4, 3), (512, 64, 4, 4), (512, 128, 4, 3), (512, 128, 8, 3),
               (512, 64, 8, 3), (1024, 64, 4, 3), (256, 64, 4, 3), (512, 32, 4, 4), (512, 32, 2, 4)]
    g = torch.Generator().manual_seed(0)
    for model, nh, nkv, batch, lo, hi in cases:
        lens = torch.randint(lo, hi + 1, (batch,), generator=g).tolist()
        q = torch.randn(batch, nh, 128, device=DEV, dtype=DT)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
        nbytes = sum(lens) * nkv * 128 * 2 * 2
        ref = None
        for layout, block in (("tok", 16), ("head", 16), ("head", 32), ("tok", 32), ("head", 64)):
            torch.manual_seed(1)
            k, v, tables = paged(lens, nkv, 128, block, layout)
            for p, bn, w, s in configs if batch > 1 else [(256, 64, 4, 3), (256, 64, 4, 2), (128, 64, 4, 3)]:
                fn = partial(ac.decode_attention, q, k, v, seq_lens, tables, 128**-0.5, partition=p, block_n=bn,
                             num_warps=w, num_stages=s)
                out = fn()
                if ref is None or block != ref[0]:
                    ref = (block, out.float())  # same data for one block size: every config must agree
                err = (out.float() - ref[1]).abs().max().item()
                record("attn", f"{model} b{batch} ctx{lo}-{hi}", f"{layout} bs{block} P{p} N{bn} w{w} s{s}",
                       us(fn), nbytes, bw, err=err)
            del k, v


def gemm(bw: float) -> None:
    shapes = {"llama3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
                            "down": (4096, 14336), "lm_head": (128256, 4096)},
              "qwen3-0.6b": {"qkv": (4096, 1024), "o": (1024, 2048), "gate_up": (6144, 1024),
                             "down": (1024, 3072), "lm_head": (151936, 1024)}}
    configs = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 128, 4, 6), (64, 128, 4, 4),
               (64, 256, 8, 3), (16, 128, 2, 6), (32, 512, 8, 3), (128, 128, 8, 3), (64, 64, 4, 6)]
    for model, layers in shapes.items():
        for name, (n, k) in layers.items():
            w = torch.randn(n, k, device=DEV, dtype=DT) / k**0.5
            for m in (1, 4, 16, 32, 64, 128, 256):
                x = torch.randn(m, k, device=DEV, dtype=DT)
                nbytes = n * k * 2
                case = f"{model} {name} m{m}"
                ref = x.float() @ w.float().t()
                record("gemm", case, "cuBLAS", us(partial(torch.matmul, x, w.t())), nbytes, bw,
                       err=(torch.matmul(x, w.t()).float() - ref).abs().max().item())
                for bn, bk, nw, ns in configs:
                    fn = partial(skinny_gemm, x, w, None, bn, bk, nw, ns)
                    try:
                        err = (fn().float() - ref).abs().max().item()
                        record("gemm", case, f"skinny N{bn} K{bk} w{nw} s{ns}", us(fn), nbytes, bw, err=err)
                    except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory) is skipped
                        print(f"gemm {case} N{bn} K{bk} w{nw} s{ns}: {type(e).__name__}", flush=True)
            del w


def gemm_chain(bw: float) -> None:
    """A decode step's GEMMs as the engine runs them: all layers' projections of the llama3-8b shape (distinct
    weights, 14 GB: nothing stays in L2) captured in one CUDA graph and replayed, so launch gaps are the
    graph's and no timing event sits between kernels. Bytes: every weight once."""
    layers, dims = 32, [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
    ws = [[torch.randn(n, k, device=DEV, dtype=DT) / k**0.5 for n, k in dims] for _ in range(layers)]
    nbytes = layers * sum(n * k * 2 for n, k in dims)
    configs = [None, (16, 256, 4, 4), (32, 256, 4, 4), (16, 128, 2, 6), (32, 128, 4, 6), (64, 256, 8, 3),
               (16, 512, 4, 3)]
    for m in (1, 4, 16, 64):
        xs = [torch.randn(m, k, device=DEV, dtype=DT) for _, k in dims]
        for cfg in configs:
            def step(cfg=cfg, xs=xs, ws=ws):
                for layer in ws:
                    for x, w in zip(xs, layer, strict=True):
                        torch.matmul(x, w.t()) if cfg is None else skinny_gemm(x, w, None, *cfg)
            name = "cuBLAS" if cfg is None else "skinny N{} K{} w{} s{}".format(*cfg)
            record("chain", f"llama3-8b 32 layers m{m}", name, graph_us(step, replays=10), nbytes, bw)


def best(kind: str) -> None:
    """Per case: cuBLAS / the current default, and the fastest config."""
    cases: dict[str, list[dict]] = {}
    for r in ROWS:
        if r["kind"] == kind:
            cases.setdefault(r["case"], []).append(r)
    for case, rows in cases.items():
        top = min(rows, key=lambda r: r["us"])
        first = rows[0]
        print(f"BEST {kind} {case:34s} {top['impl']:34s} {top['us']:8.1f} us ({top['bw_pct']:.0f} %) "
              f"vs {first['impl']} {first['us']:.1f} us ({first['bw_pct']:.0f} %)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["attention", "gemm", "chain"])
    parser.add_argument("--json")
    args = parser.parse_args()
    bw = copy_bandwidth(torch.device(DEV))
    mm = matmul_rate(torch.device(DEV), 8192, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s, "
          f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    if args.only in (None, "attention"):
        attention(bw)
    if args.only in (None, "gemm"):
        gemm(bw)
    if args.only in (None, "chain"):
        gemm_chain(bw)
    for kind in ("attn", "gemm", "chain"):
        best(kind)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bw, "matmul": mm, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
