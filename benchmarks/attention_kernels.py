"""Attention kernels on the GPU: the Triton paged kernels against flex_attention and SDPA, plus the decode
GEMMs of the bench shapes, each next to its bound (bytes / copy bandwidth, FLOPs / matmul rate).

flex_attention and SDPA get contiguous, unpaged K/V (their best case: no page gather), so a paged Triton
kernel that matches them leaves no room for a paged flex kernel to win. Numbers go to benchmarks/NOTES.md.

    python benchmarks/attention_kernels.py [--out results.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from roofline import copy_bandwidth, matmul_rate

from tprun.worker.attention_metadata import AttentionMetadata
from tprun.worker.layers import attention_cuda as ac

DEV = "cuda"
DT = torch.bfloat16
BLOCK = 16
ROWS: list[dict] = []


def ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def paged(lens: list[int], nkv: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random caches with each sequence's pages scattered: (k_cache, v_cache, block_tables)."""
    nblocks = [-(-n // BLOCK) for n in lens]
    total = sum(nblocks)
    perm = torch.randperm(total, device=DEV).to(torch.int32)
    tables = torch.full((len(lens), max(nblocks)), -1, dtype=torch.int32, device=DEV)
    at = 0
    for b, n in enumerate(nblocks):
        tables[b, :n] = perm[at:at + n]
        at += n
    k = torch.randn(total, BLOCK, nkv, hd, device=DEV, dtype=DT)
    return k, torch.randn_like(k), tables


def record(kind: str, case: str, impl: str, t_ms: float, nbytes: float = 0, flops: float = 0, **extra) -> None:
    row = {"kind": kind, "case": case, "impl": impl, "ms": t_ms, "GBps": nbytes / t_ms / 1e6,
           "TFLOPs": flops / t_ms / 1e9, **extra}
    ROWS.append(row)
    print(f"{kind:8s} {case:28s} {impl:40s} {t_ms * 1e3:9.1f} us  {row['GBps']:7.0f} GB/s "
          f"{row['TFLOPs']:6.1f} TFLOP/s", flush=True)


def length_mask(lens: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < lens[b]

    return mask_mod


def document_causal_mask(doc_q: torch.Tensor, pos_q: torch.Tensor, doc_k: torch.Tensor, pos_k: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_q[q_idx] == doc_k[kv_idx]) & (pos_k[kv_idx] <= pos_q[q_idx])

    return mask_mod


def projections(xs: list[torch.Tensor], ws: list[torch.Tensor]) -> None:
    for x, w in zip(xs, ws, strict=True):
        torch.matmul(x, w.t())


def decode_cases(bw: float, quick: bool) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    cases = [(256, 1024), (64, 1024), (16, 2048), (1, 1024)] + ([] if quick else [(256, 512), (128, 2000)])
    sweep = [(p, bn, w, s) for p in (128, 256, 512)
             for bn, w, s in ((32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (64, 2, 3))]
    for nh, nkv, hd, model in ((32, 8, 128, "llama3-8b"), (16, 8, 128, "qwen3-0.6b")):
        for batch, ctx in cases:
            gen_lens = torch.randint(ctx // 2, ctx + 1, (batch,)).tolist() if batch > 1 else [ctx]
            gen_lens[0] = ctx
            k_cache, v_cache, tables = paged(gen_lens, nkv, hd)
            lens = torch.tensor(gen_lens, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, nh, hd, device=DEV, dtype=DT)
            nbytes = sum(gen_lens) * nkv * hd * 2 * 2
            case = f"{model} b{batch} ctx<={ctx}"
            scale = hd**-0.5
            configs = sweep if model == "llama3-8b" and not quick else [(ac.DECODE_PARTITION, 64, 4, 2)]
            for p, bn, w, s in configs:
                t = ms(partial(ac.decode_attention, q, k_cache, v_cache, lens, tables, scale, partition=p,
                               block_n=bn, num_warps=w, num_stages=s))
                record("decode", case, f"triton paged P{p} N{bn} w{w} s{s}", t, nbytes, bw_pct=nbytes / t / 1e-3 / bw)
            # Unpaged, contiguous K/V for the baselines.
            kd = torch.randn(batch, nkv, ctx, hd, device=DEV, dtype=DT)
            vd = torch.randn_like(kd)
            q4 = q[:, :, None, :]

            if model == "llama3-8b":  # each new shape recompiles flex (seconds): one model is enough
                try:
                    bm = create_block_mask(length_mask(lens), batch, None, 1, ctx, device=DEV)
                    t = ms(partial(flex, q4, kd, vd, block_mask=bm, enable_gqa=True, scale=scale))
                    record("decode", case, "flex_attention unpaged (compiled)", t, nbytes,
                           bw_pct=nbytes / t / 1e-3 / bw)
                except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
                    print(f"decode {case}: flex_attention failed: {e!r}"[:400], flush=True)
            if batch == 1 or all(n == ctx for n in gen_lens):
                t = ms(partial(torch.nn.functional.scaled_dot_product_attention, q4, kd, vd, scale=scale,
                               enable_gqa=True))
                record("decode", case, "sdpa unpaged", t, nbytes, bw_pct=nbytes / t / 1e-3 / bw)


def prefill_cases(mm: float, quick: bool) -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    nh, nkv, hd = 32, 8, 128
    sweep = [(128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)]
    for seqs in ([(0, 1024)] * 8, [(512, 512)] * 8, [(0, 600), (300, 100), (0, 1000), (900, 124), (0, 200)] * 2):
        q_lens = [n for _, n in seqs]
        seq_lens = [p + n for p, n in seqs]
        k_cache, v_cache, tables = paged(seq_lens, nkv, hd)
        cu = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
        meta = AttentionMetadata(True, cu, torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
                                 torch.zeros(sum(q_lens), dtype=torch.int64, device=DEV), tables, q_lens, seq_lens,
                                 BLOCK)
        q = torch.randn(sum(q_lens), nh, hd, device=DEV, dtype=DT)
        pairs = sum(p * n + n * (n + 1) // 2 for p, n in seqs)
        flops = 4 * nh * hd * pairs
        case = f"{len(seqs)} seqs q{sum(q_lens)} kv{sum(seq_lens)}"
        for bm_, bn, w, s in (sweep if not quick else sweep[:1]):
            t = ms(partial(ac.prefill_attention, q, k_cache, v_cache, meta, hd**-0.5, block_m=bm_, block_n=bn,
                           num_warps=w, num_stages=s))
            record("prefill", case, f"triton paged M{bm_} N{bn} w{w} s{s}", t, flops=flops, mm_pct=flops / t / 1e-3 / mm)
        # flex on packed, unpaged K/V: document ids and positions say who sees whom.
        doc_q = torch.cat([torch.full((n,), b) for b, (_, n) in enumerate(seqs)]).to(DEV)
        pos_q = torch.cat([torch.arange(p, p + n) for p, n in seqs]).to(DEV)
        doc_k = torch.cat([torch.full((p + n,), b) for b, (p, n) in enumerate(seqs)]).to(DEV)
        pos_k = torch.cat([torch.arange(p + n) for p, n in seqs]).to(DEV)

        try:
            bm = create_block_mask(document_causal_mask(doc_q, pos_q, doc_k, pos_k), 1, None, len(doc_q),
                                   len(doc_k), device=DEV)
            qf = q.transpose(0, 1)[None]
            kf = torch.randn(1, nkv, len(doc_k), hd, device=DEV, dtype=DT)
            vf = torch.randn_like(kf)
            t = ms(partial(flex, qf, kf, vf, block_mask=bm, enable_gqa=True, scale=hd**-0.5))
            record("prefill", case, "flex_attention packed unpaged (compiled)", t, flops=flops,
                   mm_pct=flops / t / 1e-3 / mm)
        except Exception as e:  # noqa: BLE001
            print(f"prefill {case}: flex_attention failed: {e!r}"[:400], flush=True)


def gemm_cases(bw: float, mm: float) -> None:
    """One layer's projections (+ LM head) of each bench shape at decode batch sizes, cuBLAS via torch."""
    shapes = {"llama3-8b": (4096, 4096 + 2 * 1024, 4096, 2 * 14336, 14336, 128256, 32),
              "qwen3-0.6b": (1024, 2048 + 2 * 1024, 2048, 2 * 3072, 3072, 151936, 28)}
    for model, (h, qkv, o_in, gu, d_in, vocab, layers) in shapes.items():
        ws = [torch.randn(n, k, device=DEV, dtype=DT) for n, k in ((qkv, h), (h, o_in), (gu, h), (h, d_in))]
        lm = torch.randn(vocab, h, device=DEV, dtype=DT)
        wbytes = sum(w.numel() for w in ws) * 2
        for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            xs = [torch.randn(m, w.shape[1], device=DEV, dtype=DT) for w in ws]
            xl = torch.randn(m, h, device=DEV, dtype=DT)

            flops = 2 * m * sum(w.numel() for w in ws)
            t = ms(partial(projections, xs, ws))
            record("gemm", f"{model} layer m{m}", "cuBLAS 4 projections", t, wbytes, flops,
                   bw_pct=wbytes / t / 1e-3 / bw, mm_pct=flops / t / 1e-3 / mm,
                   model_ms=t * layers)
            t = ms(partial(torch.matmul, xl, lm.t()))
            record("gemm", f"{model} lm_head m{m}", "cuBLAS", t, lm.numel() * 2, 2 * m * lm.numel(),
                   bw_pct=lm.numel() * 2 / t / 1e-3 / bw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out")
    parser.add_argument("--quick", action="store_true", help="default configs only")
    parser.add_argument("--only", choices=["decode", "prefill", "gemm"])
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth(torch.device(DEV))
    mm = matmul_rate(torch.device(DEV), 8192, torch.bfloat16)
    print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s, "
          f"triton {triton.__version__}, torch {torch.__version__}", flush=True)
    if args.only in (None, "gemm"):
        gemm_cases(bw, mm)
    if args.only in (None, "decode"):
        decode_cases(bw, args.quick)
    if args.only in (None, "prefill"):
        prefill_cases(mm, args.quick)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "copy_Bps": bw,
                                              "matmul_flops": mm, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
