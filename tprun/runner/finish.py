"""The end of a one-world job: rank 0 waits for every TP group, then merges (all chunks done) or asks for a
requeue (stopped); every other rank waits for rank 0's verdict. (Independent groups end in groups.py.)"""

from __future__ import annotations

import sys
import time
from typing import Any

from tprun.runner import keys, parts
from tprun.runner.exit_codes import EXIT_CODES, EXIT_OK, EXIT_REQUEUE
from tprun.runner.failures import PeerFailed
from tprun.runner.plan import JobPlan
from tprun.runner.progress import Progress, format_summary
from tprun.runner.records import record_format
from tprun.runner.store_values import StoreValueError, get_int, get_json, get_text, int_list

POLL_S = 0.2


def finish_world(plan: JobPlan, ctx: Any, watchdog: Any, progress: Progress | None, elapsed: float) -> int:
    """Rank 0: wait for every group, then merge (all chunks done) or ask for a requeue (stopped).

    A stop signal that lands here needs no relaying: a group leaves its loop only when every chunk is
    handed out or the job is already stopping, so what is still running are in-flight chunks, which a
    stop would let finish anyway.
    """
    groups = [_group_result(ctx, g, watchdog) for g in range(ctx.dp_size)]
    if progress is not None:
        progress.close()
    stopped = [g for g in groups if g["stopped"]]
    missing = [k for k in range(plan.index.num_chunks) if not parts.is_done(plan.out, k)]
    if missing and stopped:
        why = get_text(ctx.store, keys.STOP) if ctx.store.check([keys.STOP]) else stopped[0]["stopped"]
        plan.log(f"stopped ({why}) with {len(missing)} of {plan.index.num_chunks} chunks "
                 f"left; exiting with {EXIT_REQUEUE} so the job is requeued; rerun to resume")
        return EXIT_REQUEUE
    if missing:
        raise RuntimeError(
            f"every group finished but chunk(s) {missing[:5]} are not in {plan.out / parts.PARTS}; "
            "is --output a directory shared by all nodes?"
        )
    merged = parts.merge(plan.out, plan.index.num_chunks, plan.index.errors, record_format(plan))
    summary = {
        "records": merged.records, "errors": merged.errors, "prompt_tokens": merged.prompt_tokens,
        "output_tokens": merged.output_tokens, "seconds": round(elapsed, 3),
        # Prompt tokens served from the prefix cache in this run (a resumed job counts only its own part).
        "cached_prompt_tokens": sum(g["cached_prompt_tokens"] for g in groups),
        "tokens_per_s": round(sum(g["tokens"] for g in groups) / elapsed, 2) if elapsed > 0 else None,
        "groups": [{**g, "tokens_per_s": round(g["tokens"] / g["seconds"], 2) if g["seconds"] else None}
                   for g in groups],
        "results": str(plan.out / parts.RESULTS),
    }
    parts.write_success(plan.out, summary)
    print(format_summary(summary), file=sys.stderr, flush=True)
    return EXIT_OK


def _await(store: Any, key: str, watchdog: Any) -> None:
    """Poll for a key with no timeout of its own: the watchdog ends the wait if a rank is lost.

    `check` instead of a blocking `wait`, which would hold this store connection for its timeout.
    """
    while not store.check([key]):
        reason = watchdog.aborted()
        if reason is not None:
            raise PeerFailed(reason)
        time.sleep(POLL_S)


_GROUP_FIELDS = {"group": int, "ranks": list, "chunks": int, "records": int, "tokens": int,
                 "cached_prompt_tokens": int, "seconds": (int, float), "stopped": (str, type(None))}


def final_code(store: Any, watchdog: Any) -> int:
    _await(store, keys.FINAL, watchdog)
    return get_int(store, keys.FINAL, EXIT_CODES)


def _group_result(ctx: Any, g: int, watchdog: Any) -> dict[str, Any]:
    key = keys.group_result(g)
    _await(ctx.store, key, watchdog)
    group = get_json(ctx.store, key, _GROUP_FIELDS)
    int_list(key, group["ranks"], 0, ctx.world_size)
    if group["group"] != g or min(group["chunks"], group["records"], group["tokens"]) < 0:
        raise StoreValueError(f"malformed value under store key {key!r}: not the result of group {g}")
    return group
