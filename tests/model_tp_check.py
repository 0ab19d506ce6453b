"""TP=2 logits equal transformers' (float64) on every rank. Launched by torchrun (gloo) from test_models.py.

Usage: torchrun --nproc-per-node 2 tests/model_tp_check.py MODEL_DIR[::HF_DIR] [...]
(HF_DIR: the checkpoint transformers loads as the reference, where it cannot load MODEL_DIR: gpt-oss MXFP4)
Prints "[ok rank=R model=DIR]" per model; exits non-zero (with the difference) on the first mismatch.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from transformers.utils import logging as hf_logging

from tests.model_harness import hf_logits, load_hf, paged_logits, prefill_logits_without_cache, sequences
from tprun.worker.models import load_model
from tprun.worker.parallel import TPGroup


def check(arg: str, tp: TPGroup) -> None:
    model_dir, _, hf_dir = arg.partition("::")
    hf = load_hf(hf_dir or model_dir)
    ours = load_model(model_dir, hf.config, tp, torch.float64, torch.device("cpu"))
    seqs = sequences(hf.config.vocab_size)
    runs = {"paged": paged_logits(ours, seqs), "no cache": prefill_logits_without_cache(ours, seqs)}
    for name, got in runs.items():
        for i, (logits, seq) in enumerate(zip(got, seqs, strict=True)):
            expected = hf_logits(hf, seq)
            if logits.shape != expected.shape or not torch.allclose(logits, expected, rtol=0, atol=1e-10):
                diff = (logits - expected).abs().max().item() if logits.shape == expected.shape else "shape"
                raise AssertionError(f"{model_dir} ({name}, seq {i}): logits differ from HF by {diff}")


def main() -> None:
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    hf_logging.disable_progress_bar()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    tp = TPGroup(rank=dist.get_rank(), size=dist.get_world_size(), group=dist.group.WORLD)
    try:
        for model_dir in sys.argv[1:]:
            check(model_dir, tp)
            print(f"[ok rank={tp.rank} model={model_dir}]", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
