"""After an exception: was it this rank's own failure or a lost peer? Name it, tell every rank.

A dead TP peer surfaces as a failed collective; a dead rank 0 as a broken store. Both are a peer's
failure (exit 76), and the message names the rank when the heartbeats can tell which one went silent.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from tprun.runner.exit_codes import EXIT_FAILED, EXIT_PEER_FAILED


class PeerFailed(Exception):
    """Another rank published why the job must stop (the message is its reason)."""


def explain_failure(e: Exception, ctx: Any, watchdog: Any, log: Callable[[str], None]) -> int:
    """Name the cause (another rank or this one), tell every rank, return the exit code."""
    reason = e.args[0] if isinstance(e, PeerFailed) else watchdog.aborted()
    if reason is None and is_collective_error(e):
        # A TP peer vanished mid-collective, or failed and wrote why: tell which.
        lost = watchdog.find_lost([r for r in ctx.tp_group_ranks if r != ctx.rank])
        first = str(e).splitlines()[0].split(" This is typically")[0]
        if lost is None:
            reason = f"rank {ctx.rank} lost the job's store (hosted by rank 0): rank 0 is probably gone ({first})"
        elif lost:
            reason = (f"{', '.join(watchdog.describe(r) for r in lost)} is gone (rank {ctx.rank} lost it in a "
                      f"collective of TP group {ctx.dp_rank}: {first})")
            watchdog.abort(reason)
        else:
            reason = watchdog.aborted()
    if reason is not None:
        log(f"stopping because {reason}; exiting with {EXIT_PEER_FAILED}")
        return EXIT_PEER_FAILED
    log(f"error: {type(e).__name__}: {e}\n{traceback.format_exc()}")
    watchdog.abort(f"rank {ctx.rank} failed: {type(e).__name__}: {e}")
    return EXIT_FAILED


def is_collective_error(e: Exception) -> bool:
    import torch.distributed as dist

    text = str(e).lower()
    return isinstance(e, dist.DistError) or "gloo" in text or "nccl" in text or "connection reset" in text
