"""`tprun run`: a JSONL file in, OUT/results.jsonl out, for DP x TP jobs that survive.

    plan (every rank, local files only) -> engine (rendezvous) -> agree on the job, rank 0 sets OUT up
    -> claim chunks while the batch has room / step the engine / write each finished chunk, until no
       chunk is left or a stop signal
    -> rank 0 merges when every group is done -> every rank exits with rank 0's verdict

Exit codes: tprun/runner/exit_codes.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tprun.config import JobSpec
from tprun.runner import keys, manifest, parts
from tprun.runner.exit_codes import (
    EXIT_FAILED,
    EXIT_JOB_ERROR,
    EXIT_OK,
    EXIT_PEER_FAILED,
    EXIT_REQUEUE,
)
from tprun.runner.failures import PeerFailed, explain_failure
from tprun.runner.inputs import Record, sampling_for
from tprun.runner.plan import JobPlan, plan_job
from tprun.runner.preflight import JobError
from tprun.runner.progress import Progress, format_summary

# How often a rank proves it is alive, and how long a silent rank has before it is declared lost.
# Detection + reaction stays well inside the 60 s a dead rank may keep the others waiting.
HEARTBEAT_S = float(os.environ.get("TPRUN_HEARTBEAT_S", "2"))
HEARTBEAT_TIMEOUT_S = float(os.environ.get("TPRUN_HEARTBEAT_TIMEOUT_S", "30"))
POLL_S = 0.2
# Test-only: a pause after each written chunk, so tests can interrupt a tiny job between chunks.
TEST_CHUNK_DELAY_S = float(os.environ.get("TPRUN_TEST_CHUNK_DELAY_S", "0"))
SHUTDOWN_TIMEOUT_S = 60.0


def run_job(spec: JobSpec, *, overwrite: bool = False, quiet: bool = False) -> int:
    """Run one process's share of the job; returns the process exit code (see exit_codes.py)."""
    from tprun.runner.signals import StopFlag

    # From the first instant: a preemption during start-up must become "requeue", not a default death.
    # A stop that lands before the engine is up is seen at the first claim, and the job exits 75 at once.
    stop = StopFlag().install()
    try:
        try:
            plan = plan_job(spec, overwrite)
        except JobError as e:
            print(f"tprun: error: {e}", file=sys.stderr, flush=True)
            return EXIT_JOB_ERROR
        if isinstance(plan, int):
            return plan
        stop.log = plan.log
        return _run(plan, quiet, stop)
    finally:
        # Only now: a stop signal that lands after the verdict must not kill the process with it unreported.
        stop.restore()


def _run(plan: JobPlan, quiet: bool, stop: Any) -> int:
    spec, log = plan.spec, plan.log
    from tprun.engine.llm import LLM

    try:
        llm = LLM(model=spec.model, tensor_parallel_size=spec.parallel.tensor_parallel_size,
                  data_parallel_size=spec.parallel.data_parallel_size, dtype=spec.dtype, **spec.engine)
    except (ValueError, FileNotFoundError, TypeError) as e:
        log(f"error: {e}")
        return EXIT_JOB_ERROR
    except Exception as e:  # noqa: BLE001 - any engine start failure becomes an exit code, not a traceback
        log(f"error: the engine failed to start: {type(e).__name__}: {e}")
        return EXIT_FAILED
    code = EXIT_FAILED
    try:
        code = _run_engine(plan, llm, quiet, stop)
        return code
    finally:
        _shutdown(llm, code)


def _shutdown(llm: Any, code: int) -> None:
    """Tear the engine down, bounded: after a peer died mid-collective, destroying the process group
    could block (NCCL) forever; then leave with the exit code already decided."""
    import threading

    timer = threading.Timer(SHUTDOWN_TIMEOUT_S, _hard_exit, args=(code, "the engine did not shut down within "
                                                                  f"{SHUTDOWN_TIMEOUT_S:.0f} s"))
    timer.daemon = True
    timer.start()
    try:
        llm.shutdown()
    finally:
        timer.cancel()


def _run_engine(plan: JobPlan, llm: Any, quiet: bool, stop: Any) -> int:
    from tprun.runner.chunks import ChunkClaimer
    from tprun.runner.watchdog import Watchdog

    ctx, log = llm.dist, plan.log
    try:
        _agree_on_job(plan, ctx)
    except JobError as e:
        log(f"error: {e}")
        return EXIT_JOB_ERROR
    except (RuntimeError, OSError) as e:
        log(f"error: ranks could not compare their view of the job: {e}")
        return EXIT_PEER_FAILED

    watchdog = Watchdog(ctx.store, ctx.rank, ctx.world_size, period_s=HEARTBEAT_S,
                        timeout_s=HEARTBEAT_TIMEOUT_S, log=log).start()
    progress = None
    if ctx.rank == 0:
        done_before = sum(parts.read_done(plan.out, k)["records"] for k in range(plan.index.num_chunks)
                          if parts.is_done(plan.out, k))
        log(f"running {plan.index.num_records - done_before} of {plan.index.num_records} records "
            f"({plan.index.num_chunks} chunk(s) of {plan.spec.chunk_size} lines) on tp({ctx.tp_size}) x "
            f"dp({ctx.dp_size}); results in {plan.out}")
        progress = Progress(ctx.store, total=plan.index.num_records, already_done=done_before,
                            quiet=quiet).start()
    claimer = ChunkClaimer(ctx.store, num_chunks=plan.index.num_chunks,
                           is_done=lambda k: parts.is_done(plan.out, k), tp_rank=ctx.tp_rank,
                           tp_size=ctx.tp_size, tp_group=ctx.tp_cpu_group, stop=stop)
    t0 = time.monotonic()
    failed = False
    try:
        group = _work(plan, llm, claimer)
        if ctx.is_tp_leader:
            ctx.store.set(keys.group_result(ctx.dp_rank), json.dumps(group))
        if ctx.rank == 0:
            code = _finish(plan, ctx, watchdog, progress, time.monotonic() - t0)
            ctx.store.set(keys.FINAL, str(code))
        else:
            code = _await(ctx.store, keys.FINAL, watchdog)
    except Exception as e:  # noqa: BLE001 - whatever failed, the other ranks must hear of it and stop
        code, failed = explain_failure(e, ctx, watchdog, plan.log), True
    finally:
        if progress is not None:
            progress.close()
    watchdog.stop()
    if not failed:
        _leave(ctx)
    elif ctx.rank == 0 and ctx.world_size > 1:
        time.sleep(watchdog.linger_s)  # rank 0 hosts the store: let the others read why before it goes
    return code


def _agree_on_job(plan: JobPlan, ctx: Any) -> None:
    """Every rank must have read the same input, model and spec, and see rank 0's OUT; then rank 0 sets
    OUT up for this job. Collectives, so every rank reaches the same verdict and none waits for another.

    Nothing is written into OUT before this point: every rank's local checks read the same OUT.
    """
    import torch.distributed as dist

    def gather(mine: Any) -> list[Any]:
        views: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(views, mine, group=ctx.world_cpu_group)
        return views

    views = gather((manifest.fingerprint(plan.identity), socket.gethostname()))
    odd = [r for r, (fp, _) in enumerate(views) if fp != views[0][0]]
    if odd:
        raise JobError(
            f"rank(s) {odd} (on {sorted({views[r][1] for r in odd})}) read a different input, model or spec "
            f"than rank 0 (on {views[0][1]}); every rank needs the same files, e.g. on a shared filesystem"
        )
    problem = None
    if ctx.rank == 0:
        try:
            manifest.prepare(plan.out, plan.identity, plan.state)
            parts.remove_stale_temporaries(plan.out)
        except OSError as e:
            problem = f"rank 0 cannot set up {plan.out}: {e}"
    problem = gather(problem)[0]  # also the barrier behind rank 0's writes
    if problem:
        raise JobError(problem)
    seen = gather(manifest.load(plan.out) is not None)
    blind = [r for r, sees in enumerate(seen) if not sees]
    if blind:
        raise JobError(
            f"rank(s) {blind} (on {sorted({views[r][1] for r in blind})}) do not see the manifest rank 0 wrote "
            f"into {plan.out} on {views[0][1]}; --output must be a directory shared by all nodes"
        )


@dataclass
class _Chunk:
    index: int
    records: list[Record]
    started: float
    outputs: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.records)


def _work(plan: JobPlan, llm: Any, claimer: Any) -> dict[str, Any]:
    """This TP group's loop; returns its stats for this run.

    Chunks are claimed while fewer than `max_num_seqs` requests are queued, so the engine's batch stays
    full across chunk boundaries. Every rank of the group sees the same outputs at the same steps, so
    all call claimer.next() (a group collective) at the same moments.
    """
    ctx, spec = llm.dist, plan.spec
    stats = {"group": ctx.dp_rank, "ranks": ctx.tp_group_ranks, "chunks": 0, "records": 0, "tokens": 0,
             "seconds": 0.0, "stopped": None}
    keep_queued = llm.config.max_num_seqs
    inflight: dict[int, _Chunk] = {}
    queued, exhausted, t0 = 0, False, time.monotonic()
    while True:
        while not exhausted and queued < keep_queued:
            k = claimer.next()
            if k is None:
                exhausted = True
                break
            chunk = inflight[k] = _Chunk(k, plan.index.read_chunk(k, spec.sampling, plan.vocab_size), time.monotonic())
            for i, r in enumerate(chunk.records):
                llm.add_request(f"{k}:{i}", r.engine_prompt(), sampling_for(r, spec.sampling, plan.job_seed))
            queued += len(chunk.records)
        if not llm.has_unfinished_requests() and any(not c.complete for c in inflight.values()):
            raise RuntimeError("the engine has no requests left but chunks are incomplete (a bug)")
        for out in llm.step() if llm.has_unfinished_requests() else []:
            k, _, i = out.request_id.partition(":")
            inflight[int(k)].outputs[i] = out
            queued -= 1
        for k in [k for k, c in inflight.items() if c.complete]:  # claim order: deterministic on every rank
            _write_chunk(plan, ctx, inflight.pop(k), stats)
            if TEST_CHUNK_DELAY_S:
                time.sleep(TEST_CHUNK_DELAY_S)
        if exhausted and not inflight:
            break
    stats["seconds"] = round(time.monotonic() - t0, 3)
    stats["stopped"] = claimer.stopped
    return stats


def _write_chunk(plan: JobPlan, ctx: Any, chunk: _Chunk, stats: dict[str, Any]) -> None:
    results = [_result(r, chunk.outputs[str(i)]) for i, r in enumerate(chunk.records)]
    tokens = sum(len(r["output_token_ids"]) for r in results)
    if ctx.is_tp_leader:
        parts.write_part(plan.out, chunk.index, results, {
            "chunk": chunk.index, "records": len(results), "tokens": tokens,
            "seconds": round(time.monotonic() - chunk.started, 3), "group": ctx.dp_rank,
            "host": socket.gethostname(), "finished_at": time.time(),
        })
        ctx.store.add(keys.RECORDS_DONE, len(results))
        ctx.store.add(keys.TOKENS_DONE, tokens)
    stats["chunks"] += 1
    stats["records"] += len(results)
    stats["tokens"] += tokens


def _result(record: Record, out: Any) -> dict[str, Any]:
    c = out.outputs[0]
    res = {"line": record.line, "id": record.id, "output_text": c.text, "output_token_ids": list(c.token_ids),
           "finish_reason": c.finish_reason, "num_prompt_tokens": len(out.prompt_token_ids)}
    if c.finish_reason == "error":
        res["error"] = c.error
    return res


def _finish(plan: JobPlan, ctx: Any, watchdog: Any, progress: Progress | None, elapsed: float) -> int:
    """Rank 0: wait for every group, then merge (all chunks done) or ask for a requeue (stopped).

    A stop signal that lands here needs no relaying: a group leaves its loop only when every chunk is
    handed out or the job is already stopping, so what is still running are in-flight chunks, which a
    stop would let finish anyway.
    """
    groups = [json.loads(_await(ctx.store, keys.group_result(g), watchdog, raw=True))
              for g in range(ctx.dp_size)]
    if progress is not None:
        progress.close()
    stopped = [g for g in groups if g["stopped"]]
    missing = [k for k in range(plan.index.num_chunks) if not parts.is_done(plan.out, k)]
    if missing and stopped:
        why = ctx.store.get(keys.STOP).decode() if ctx.store.check([keys.STOP]) else stopped[0]["stopped"]
        plan.log(f"stopped ({why}) with {len(missing)} of {plan.index.num_chunks} chunks "
                 f"left; exiting with {EXIT_REQUEUE} so the job is requeued; rerun to resume")
        return EXIT_REQUEUE
    if missing:
        raise RuntimeError(
            f"every group finished but chunk(s) {missing[:5]} are not in {plan.out / parts.PARTS}; "
            "is --output a directory shared by all nodes?"
        )
    merged = parts.merge(plan.out, plan.index.num_chunks, plan.index.errors)
    summary = {
        "records": merged.records, "errors": merged.errors, "prompt_tokens": merged.prompt_tokens,
        "output_tokens": merged.output_tokens, "seconds": round(elapsed, 3),
        "tokens_per_s": round(sum(g["tokens"] for g in groups) / elapsed, 2) if elapsed > 0 else None,
        "groups": [{**g, "tokens_per_s": round(g["tokens"] / g["seconds"], 2) if g["seconds"] else None}
                   for g in groups],
        "results": str(plan.out / parts.RESULTS),
    }
    parts.write_success(plan.out, summary)
    print(format_summary(summary), file=sys.stderr, flush=True)
    return EXIT_OK


def _await(store: Any, key: str, watchdog: Any, raw: bool = False) -> Any:
    """Poll for a key with no timeout of its own: the watchdog ends the wait if a rank is lost.

    `check` + `get` instead of a blocking `wait`, which would hold this store connection for its timeout.
    """
    while not store.check([key]):
        reason = watchdog.aborted()
        if reason is not None:
            raise PeerFailed(reason)
        time.sleep(POLL_S)
    value = store.get(key).decode()
    return value if raw else int(value)


def _hard_exit(code: int, why: str) -> None:
    print(f"tprun: {why}; exiting with {code}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(code)


def _leave(ctx: Any) -> None:
    """Rank 0 hosts the store: it leaves last, once every rank has read the verdict (bounded wait)."""
    # A peer already gone cannot be waited for; the verdict is written either way.
    with contextlib.suppress(RuntimeError, OSError):
        if ctx.rank != 0:
            ctx.store.add(keys.ACKS, 1)
            return
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT_S
        while ctx.store.add(keys.ACKS, 0) < ctx.world_size - 1 and time.monotonic() < deadline:
            time.sleep(POLL_S)
