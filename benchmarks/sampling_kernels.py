"""GPU time of the seeded sampler (tprun/worker/sampling_race*.py) at the bench vocabulary, each call captured
in a CUDA graph and replayed (do_bench alone would time the host's launches: a sample() is ~15 small ones):
the stats pass alone, the full top-p cut, the race, the first race of a draw (which computes the stats in the
same read), and a whole sample() with and without top-p, for flat logits
(the random-weight bench models: top-p keeps ~95 % of the vocabulary) and peaked ones (an LLM-like row:
a few dozen tokens far above the rest).

    python3 benchmarks/sampling_kernels.py          # GPU only
"""

from __future__ import annotations

import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if "pydantic" not in sys.modules:  # the GPU image may lack pydantic: load tprun.worker without tprun/__init__
    try:
        import pydantic  # noqa: F401
    except ImportError:
        package = types.ModuleType("tprun")
        package.__path__ = [str(ROOT / "tprun")]
        sys.modules["tprun"] = package

import torch  # noqa: E402
from roofline import graph_us  # noqa: E402

from tprun.worker import sampling_race as sr  # noqa: E402
from tprun.worker import sampling_race_cuda as rc  # noqa: E402

VOCAB = 151936


def data(rows: int, dtype: torch.dtype, peaked: bool):
    g = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, VOCAB, device="cuda", generator=g) * 2
    if peaked:
        top = torch.randint(0, VOCAB, (rows, 32), device="cuda", generator=g)
        x.scatter_add_(1, top, 10 + 8 * torch.rand(rows, 32, device="cuda", generator=g))
    temp = torch.full((rows,), 0.8, device="cuda")
    top_p = torch.full((rows,), 0.95, device="cuda")
    keys = torch.tensor([sr.row_key(s, 5, 0) for s in range(rows)], dtype=torch.int64, device="cuda")
    return x.to(dtype), temp, top_p, keys


_UPLOADED: dict = {}


def to_device(values, dtype):
    """The engine uploads through pinned memory; here the first call uploads and a captured call reuses it."""
    key = (tuple(values), dtype)
    if key not in _UPLOADED:
        _UPLOADED[key] = torch.tensor(values, dtype=dtype, device="cuda")
    return _UPLOADED[key]


def timings(rows: int, dtype: torch.dtype, peaked: bool) -> list[float]:
    """us: stats, full cut, race, race + stats, sample() with top-p, without; host us per sample() call."""
    x, temp, top_p, keys = data(rows, dtype, peaked)
    passes = rc.TritonPasses(x, temp)
    tau = passes.cut(top_p)
    args = (list(range(rows)), [5] * rows, to_device)
    whole = sr.no_cut(dtype, rows, "cuda")
    gpu = [graph_us(fn) for fn in (lambda: rc.TritonPasses(x, temp).m, lambda: passes.cut(top_p),
                                         lambda: passes.race(keys, tau),
                                         lambda: rc.TritonPasses(x, temp).race(keys, whole),
                                         lambda: sr.sample(x, temp, top_p, *args),
                                         lambda: sr.sample(x, temp, None, *args))]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        sr.sample(x, temp, top_p, *args)
    host = (time.perf_counter() - t0) / 50 * 1e6
    torch.cuda.synchronize()
    return [*gpu, host]


def main() -> None:
    print(f"{torch.cuda.get_device_name()}; GPU us per call (CUDA graph replays); host us per sample() call")
    print(f"{'data':6} {'dtype':8} {'rows':>4} | {'stats':>6} {'cut':>6} {'race':>6} {'race+s':>6} | {'top-p':>7} "
          f"{'none':>6} | host")
    for peaked, dtype in ((False, torch.bfloat16), (False, torch.float32), (True, torch.bfloat16)):
        for rows in (1, 8, 64, 256):
            t = timings(rows, dtype, peaked)
            print(f"{'peaked' if peaked else 'flat':6} {str(dtype)[6:]:8} {rows:4} | {t[0]:6.0f} {t[1]:6.0f} "
                  f"{t[2]:6.0f} {t[3]:6.0f} | {t[4]:7.0f} {t[5]:6.0f} | {t[6]:.0f}", flush=True)


if __name__ == "__main__":
    main()
