"""Every launched process runs one worker and a full engine; the launcher says where it sits.

No control messages flow between ranks: each rank's engine sees the same prompts and makes the same
decisions. The only cross-rank agreement outside the model is the KV-cache size (a MIN all_reduce),
because ranks can have different free memory (communication buffers differ per rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tprun.executor.uniproc import UniProcExecutor
from tprun.launchers import detect_launcher
from tprun.launchers.base import DistributedArgs


class ExecutorWithExternalLauncher(UniProcExecutor):
    def _distributed_args(self) -> DistributedArgs:
        launcher = detect_launcher()
        resolve = getattr(launcher, "resolve_master", None)
        if resolve is not None:  # e.g. Kubernetes: the master's DNS name may not exist yet
            resolve(self.config.dist_timeout_s)
        return launcher.distributed_args()

    def determine_num_available_blocks(self) -> int:
        mine = super().determine_num_available_blocks()
        t = torch.tensor([mine], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.dist.world_cpu_group)
        return int(t.item())
