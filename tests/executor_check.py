"""Exercises ExecutorWithExternalLauncher on every rank (launched by torchrun); writes rank<R>.json.

Usage: executor_check.py OUT_DIR MODEL_DIR NEW_MASTER_PORT
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from tprun import LLM, SamplingParams
from tprun.executor import ReconfigureDistributedRequest


def main() -> None:
    out, model, new_port = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    rank = int(os.environ["RANK"])
    block_bytes_hint = 1 << 16
    # Each rank gets a different KV budget: the executor must settle on the smallest.
    llm = LLM(model=model, tensor_parallel_size=2, dtype="float32", kv_cache_memory=block_bytes_hint * (rank + 1),
              dist_timeout_s=60)
    ex = llm.llm_engine.executor
    report: dict = {"rank": rank, "num_blocks": llm.llm_engine.num_blocks,
                    "own_blocks": ex.worker.determine_num_available_blocks()}
    report["rpc_name"] = ex.collective_rpc("determine_num_available_blocks")
    report["rpc_callable"] = ex.collective_rpc(lambda w, k: (w.dist.rank, k), args=(7,))
    fut = ex.collective_rpc(lambda w: w.dist.tp_rank, non_block=True)[0]
    report["non_block_is_future"] = hasattr(fut, "result") and fut.result(timeout=30) == rank
    try:
        ex.collective_rpc(lambda w: time.sleep(3), timeout=0.2)
        report["timeout_raised"] = False
    except TimeoutError as e:
        report["timeout_raised"] = "did not finish within 0.2" in str(e)
    ex.check_health()
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [[11, 12, 13], [20, 21]]
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    ex.reinitialize_distributed(ReconfigureDistributedRequest("127.0.0.1", new_port, 2, rank))
    ex.check_health()
    after = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    report["same_tokens_after_reinit"] = before == after
    dist.destroy_process_group()
    try:
        ex.check_health()
        report["health_after_destroy"] = "no error"
    except RuntimeError as e:
        report["health_after_destroy"] = str(e)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
