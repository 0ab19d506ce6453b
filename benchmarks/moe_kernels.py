"""The Triton fused-MoE kernels at the qwen3-30b-a3b expert shapes (E 128, k 8, hidden 2048, intermediate 768,
bf16), one layer, per regime of tokens per step: each GEMM's candidate tiles are checked against a float32
torch reference, timed (median, L2 flushed), and set against the bytes of the experts the step touches
over the copy bandwidth measured in the same run. The fastest correct tiles per regime are written as a
TPRUN_MOE_CONFIGS table (tprun/worker/layers/moe_cuda.py).

    python benchmarks/moe_kernels.py --configs-out moe_configs.json --json moe_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from roofline import measure_ceilings  # noqa: E402

from tprun.worker.layers import moe  # noqa: E402
from tprun.worker.layers import moe_cuda as mc  # noqa: E402

E, K_TOP, H, INTER = 128, 8, 2048, 768
REGIMES = {"tiny": 8, "small": 64, "decode": 256, "prefill": 4096}  # tokens per step


def cfg(bm, bn, bk, warps, stages, group=1) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group, "num_warps": warps, "num_stages": stages}


CANDIDATES = {
    "tiny": [cfg(16, 32, 128, 4, 4), cfg(16, 64, 128, 4, 4), cfg(16, 32, 256, 4, 3), cfg(16, 16, 256, 2, 4)],
    "small": [cfg(16, 64, 128, 4, 4), cfg(16, 32, 128, 4, 4), cfg(16, 128, 64, 4, 4), cfg(16, 64, 256, 4, 3)],
    "decode": [cfg(16, 64, 128, 4, 4), cfg(32, 64, 128, 4, 4), cfg(32, 128, 64, 4, 4), cfg(16, 128, 128, 8, 3),
               cfg(64, 64, 128, 4, 3)],
    "prefill": [cfg(64, 64, 64, 4, 3, 8), cfg(128, 64, 64, 8, 3, 8), cfg(64, 128, 64, 8, 3, 8),
                cfg(128, 64, 32, 4, 4, 8)],
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if a.isnan().any():
        return float("inf")
    return ((a - b).norm() / b.norm()).item()


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") / 1e3


def run_regime(name: str, tokens: int, w13, w2, bandwidth: float, gen: torch.Generator) -> dict:
    x = torch.randn(tokens, H, generator=gen).to("cuda", torch.bfloat16)
    weights, ids = moe.softmax_topk(torch.randn(tokens, E, generator=gen).cuda(), K_TOP, renormalize=True)
    weights = weights.to(torch.bfloat16)
    numel = tokens * K_TOP
    flat_w = weights.reshape(-1).contiguous()
    touched = ids.unique().numel()
    expert_bytes = 3 * H * INTER * 2
    # float32 references of both GEMMs (the second from the reference's own intermediate)
    ref_inter = torch.empty(numel, INTER, device="cuda")
    ref_out = torch.empty(numel, H, device="cuda")
    xf, w13f, w2f = x.float(), w13.float(), w2.float()
    flat_ids = ids.reshape(-1)
    for e in ids.unique().tolist():
        rows = (flat_ids == e).nonzero().squeeze(1)
        ref_inter[rows] = moe.silu_and_mul(xf[rows // K_TOP] @ w13f[e].T)
        ref_out[rows] = (ref_inter[rows] @ w2f[e].T) * flat_w[rows].float()[:, None]
    inter_in = ref_inter.to(torch.bfloat16)  # the down GEMM's input, the same for every candidate
    results, best_up, best_down = [], {}, {}
    for c in CANDIDATES[name]:
        row = {"config": c}
        try:
            layout = mc.moe_align_block_size(ids, E, c["BLOCK_M"])
            inter = torch.full((numel, INTER), float("nan"), dtype=torch.bfloat16, device="cuda")
            out = torch.full((numel, H), float("nan"), dtype=torch.bfloat16, device="cuda")

            def up(c=c, layout=layout, inter=inter):
                mc._gemm(x, w13, None, inter, flat_w, layout, c, numel, K_TOP, mc.ACT_SILU, False, 1.0, 0.0)

            def down(c=c, layout=layout, out=out):
                mc._gemm(inter_in, w2, None, out, flat_w, layout, c, numel, 1, mc.ACT_NONE, True, 1.0, 0.0)

            up()
            down()
            torch.cuda.synchronize()
            row["err_up"], row["err_down"] = rel(inter, ref_inter), rel(out, ref_out)
            row["up_s"], row["down_s"] = bench(up), bench(down)
            row["align_s"] = bench(lambda c=c: mc.moe_align_block_size(ids, E, c["BLOCK_M"]))
        except Exception as e:  # noqa: BLE001 (a tile that does not compile or fit is skipped, and reported)
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(row)
        print(name, json.dumps(row), flush=True)
        if "error" in row:
            continue
        bm = c["BLOCK_M"]
        if row["err_up"] < 1e-2 and row["up_s"] < best_up.get(bm, (float("inf"),))[0]:
            best_up[bm] = (row["up_s"], c)
        if row["err_down"] < 1e-2 and row["down_s"] < best_down.get(bm, (float("inf"),))[0]:
            best_down[bm] = (row["down_s"], c)
    both = [bm for bm in best_up if bm in best_down]
    bm = min(both, key=lambda m: best_up[m][0] + best_down[m][0])
    down_cfg = {k: v for k, v in best_down[bm][1].items() if k != "BLOCK_M"}
    chosen = dict(best_up[bm][1]) | {"down": down_cfg}
    # The whole layer as the model calls it, with the chosen tiles.
    mc.CONFIGS[name] = chosen
    mc._configs.cache_clear()
    layer = bench(lambda: moe.fused_experts(x, w13, w2, weights, ids, moe.silu_and_mul))
    err = rel(moe.fused_experts(x, w13, w2, weights, ids, moe.silu_and_mul),
              ref_out.view(tokens, K_TOP, H).sum(1))
    floor_s = touched * expert_bytes / bandwidth
    flops = 2 * numel * 3 * H * INTER
    summary = {"regime": name, "tokens": tokens, "experts_touched": touched, "chosen": chosen,
               "layer_s": layer, "layer_rel_err": err, "floor_s": floor_s, "pct_of_bandwidth_floor": 100 * floor_s / layer,
               "tflops": flops / layer / 1e12, "candidates": results}
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs-out", help="write the chosen tiles here (a TPRUN_MOE_CONFIGS table)")
    p.add_argument("--json", help="write every measurement here")
    args = p.parse_args()
    ceilings = measure_ceilings(torch.device("cuda"))
    gen = torch.Generator().manual_seed(0)
    w13 = (torch.randn(E, 2 * INTER, H, device="cuda") * H**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, INTER, device="cuda") * INTER**-0.5).to(torch.bfloat16)
    out = {"device": ceilings.device_name, "bandwidth": ceilings.bandwidth, "matmul_flops": ceilings.matmul_flops,
           "regimes": [run_regime(n, t, w13, w2, ceilings.bandwidth, gen) for n, t in REGIMES.items()]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.configs_out:
        Path(args.configs_out).write_text(json.dumps({r["regime"]: r["chosen"] for r in out["regimes"]}, indent=1))
    print(f"\nMoE layer (E {E}, k {K_TOP}, H {H}, I {INTER}, bf16) on {ceilings.device_name}: copy "
          f"{ceilings.bandwidth / 1e12:.2f} TB/s, matmul {ceilings.matmul_flops / 1e12:.0f} TFLOP/s")
    print("regime   tokens experts  layer_us  floor_us  %floor  TFLOP/s  rel_err  chosen (BM,BN,BK,w,s; down BN,BK)")
    for r in out["regimes"]:
        c, d = r["chosen"], r["chosen"]["down"]
        print(f"{r['regime']:8} {r['tokens']:6} {r['experts_touched']:7} {r['layer_s'] * 1e6:9.1f} "
              f"{r['floor_s'] * 1e6:9.1f} {r['pct_of_bandwidth_floor']:6.1f} {r['tflops']:8.1f} {r['layer_rel_err']:.1e}"
              f"  {c['BLOCK_M']},{c['BLOCK_N']},{c['BLOCK_K']},{c['num_warps']},{c['num_stages']};"
              f" {d['BLOCK_N']},{d['BLOCK_K']}")


if __name__ == "__main__":
    main()
