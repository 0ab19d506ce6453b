"""One rank of the chunk-claiming protocol with fake work, launched by torchrun; writes rank<R>.json.

TP groups of 2 over gloo and the job's TCPStore, as the engine sets them up; group 1 works slower, so
group 0 should come back for more. No model: only ChunkClaimer is under test.

Usage: chunks_check.py OUT_DIR NUM_CHUNKS DONE_CHUNKS(comma list) STOP_RANK STOP_AFTER
  STOP_RANK/STOP_AFTER: that rank raises its stop flag after it has worked STOP_AFTER chunks (-1: never).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from tprun.runner.chunks import ChunkClaimer
from tprun.runner.signals import StopFlag

TP = 2


def main() -> None:
    out, num_chunks = Path(sys.argv[1]), int(sys.argv[2])
    done = {int(k) for k in sys.argv[3].split(",") if k}
    stop_rank, stop_after = int(sys.argv[4]), int(sys.argv[5])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    groups = [dist.new_group(list(range(g * TP, (g + 1) * TP))) for g in range(world // TP)]
    store = dist.PrefixStore("chunks-check/", dist.distributed_c10d._get_default_store())
    stop = StopFlag()
    claimer = ChunkClaimer(store, num_chunks=num_chunks, is_done=lambda k: k in done, tp_rank=rank % TP,
                           tp_size=TP, tp_group=groups[rank // TP], stop=stop)
    worked: list[int] = []
    while (k := claimer.next()) is not None:
        worked.append(k)
        time.sleep(0.02 if rank // TP == 0 else 0.15)
        if rank == stop_rank and len(worked) == stop_after:
            stop.request("test")
    (out / f"rank{rank}.json").write_text(json.dumps({"worked": worked, "stopped": claimer.stopped}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
