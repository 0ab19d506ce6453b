"""One rank of the chunk-claiming protocol with fake work, launched by torchrun; writes rank<R>.json.

TP groups of 2 over gloo and the job's TCPStore, as the engine sets them up. No model: only ChunkClaimer
is under test. Which group is slow is decided by events in the store, not by sleeps, so a busy machine
cannot change the outcome:
  without a stop: group 0 holds its first chunk until group 1 has one, which group 1 holds until group 0
                  found no chunk left (group 0 takes all the rest);
  with a stop:    group 0 holds its first chunk until the stop is in the store (it stops at its next boundary),
                  and the stopping rank raises its flag only once group 0 holds that chunk (or a slow start of
                  group 0 would find the stop before its first claim).

Usage: chunks_check.py OUT_DIR NUM_CHUNKS DONE_CHUNKS(comma list) STOP_RANK STOP_AFTER
  STOP_RANK/STOP_AFTER: that rank raises its stop flag after it has worked STOP_AFTER chunks (-1: never).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from tprun.runner import keys
from tprun.runner.chunks import ChunkClaimer
from tprun.runner.signals import StopFlag

TP = 2
HOLD = datetime.timedelta(seconds=60)  # generous: only a broken claimer waits this long
CLAIMED = "test/group1-claimed"
EXHAUSTED = "test/group0-exhausted"
OTHER_HOLDS = "test/other-group-holds-a-chunk"


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
    group = rank // TP
    while (k := claimer.next()) is not None:
        worked.append(k)
        if len(worked) == 1 and stop_rank < 0:
            if group == 1:
                store.set(CLAIMED, "1")
            store.wait([EXHAUSTED if group == 1 else CLAIMED], HOLD)
        if len(worked) == 1 and stop_rank >= 0 and group != stop_rank // TP:
            store.set(OTHER_HOLDS, "1")
            store.wait([keys.STOP], HOLD)
        if rank == stop_rank and len(worked) == stop_after:
            store.wait([OTHER_HOLDS], HOLD)
            stop.request("test")
    if group == 0 and rank % TP == 0:
        store.set(EXHAUSTED, "1")
    (out / f"rank{rank}.json").write_text(json.dumps({"worked": worked, "stopped": claimer.stopped}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
