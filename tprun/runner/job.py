"""`tprun run`: a JSONL file in, OUT/results.jsonl out, for DP x TP jobs that survive.

    plan (every rank, local files only) -> every rank hears every rank's verdict (startup.py)
    -> engine (rendezvous), verdicts again -> agree on the job (agree.py), rank 0 sets OUT up
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
from tprun.runner import keys, parts
from tprun.runner.exit_codes import EXIT_FAILED, EXIT_JOB_ERROR, EXIT_PEER_FAILED
from tprun.runner.failures import explain_failure
from tprun.runner.finish import final_code, finish_world
from tprun.runner.inputs import Record, sampling_for
from tprun.runner.plan import JobPlan, Log, launch_args, plan_job
from tprun.runner.preflight import JobError
from tprun.runner.progress import Progress
from tprun.runner.records import completion_tokens, record_format
from tprun.runner.startup import READY, StartupBoard, open_board, settle

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
            launcher, dargs = launch_args()
        except JobError as e:
            print(f"tprun: error: {e}", file=sys.stderr, flush=True)
            return EXIT_JOB_ERROR
        log = Log(dargs.rank, dargs.world_size)
        stop.log = log
        board = None
        if dargs.world_size > 1 and dargs.rank == 0:  # the store from the start: reachable while rank 0 plans
            board = open_board(spec, launcher, dargs, log, ready=True)
            if board is None:
                return EXIT_FAILED
        try:
            plan: JobPlan | int = plan_job(spec, overwrite, dargs, log)
            code, reason = (READY, "") if isinstance(plan, JobPlan) else (plan, f"exit code {plan} (see its log)")
        except JobError as e:
            log(f"error: {e}")
            plan, code, reason = EXIT_JOB_ERROR, EXIT_JOB_ERROR, str(e)
        if dargs.world_size > 1:
            board = board or open_board(spec, launcher, dargs, log, ready=code == READY)
            if board is None:
                return EXIT_PEER_FAILED if code == READY else code
            code = settle(board, "plan", code, reason, log)
            if code != READY:
                return code
        if not isinstance(plan, JobPlan):
            return plan
        return _run(plan, quiet, stop, board)
    finally:
        # Only now: a stop signal that lands after the verdict must not kill the process with it unreported.
        stop.restore()


def _run(plan: JobPlan, quiet: bool, stop: Any, board: StartupBoard | None) -> int:
    spec, log = plan.spec, plan.log
    from tprun.engine.llm import LLM

    llm, code, reason = None, READY, ""
    with board.guard("engine") if board is not None else contextlib.nullcontext():
        try:
            llm = LLM(model=spec.model, tensor_parallel_size=spec.parallel.tensor_parallel_size,
                      data_parallel_size=spec.group_parallel.data_parallel_size, dtype=spec.dtype, **spec.engine)
        except (ValueError, FileNotFoundError, TypeError) as e:
            log(f"error: {e}")
            code, reason = EXIT_JOB_ERROR, str(e)
        except Exception as e:  # noqa: BLE001 - any engine start failure becomes an exit code, not a traceback
            log(f"error: the engine failed to start: {type(e).__name__}: {e}")
            code, reason = EXIT_FAILED, f"the engine failed to start: {type(e).__name__}: {e}"
    if board is not None:
        code = settle(board, "engine", code, reason, log)
    if code != READY:
        # An engine that failed half-way may leave its process groups behind, with a collective the
        # others abandoned: release them here, bounded, rather than at interpreter exit, unbounded.
        _shutdown(llm.shutdown if llm is not None else _destroy_process_groups, code)
        return code
    code = EXIT_FAILED
    try:
        code = _run_engine(plan, llm, quiet, stop)
        return code
    finally:
        _shutdown(llm.shutdown, code)


def _destroy_process_groups() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # best effort: the verdict is already decided and published
        if dist.is_initialized():
            dist.destroy_process_group()


def _shutdown(close: Any, code: int) -> None:
    """Tear the engine down, bounded: after a peer died mid-collective, destroying the process group
    could block (NCCL) forever; then leave with the exit code already decided."""
    import threading

    timer = threading.Timer(SHUTDOWN_TIMEOUT_S, _hard_exit, args=(code, "the engine did not shut down within "
                                                                  f"{SHUTDOWN_TIMEOUT_S:.0f} s"))
    timer.daemon = True
    timer.start()
    try:
        close()
    finally:
        timer.cancel()


def _run_engine(plan: JobPlan, llm: Any, quiet: bool, stop: Any) -> int:
    from tprun.runner import groups
    from tprun.runner.agree import agree_on_job
    from tprun.runner.chunks import ChunkClaimer
    from tprun.runner.watchdog import Watchdog

    ctx, log = llm.dist, plan.log
    try:
        agree_on_job(plan, ctx)
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
    independent = plan.spec.parallel.groups == "independent"  # claims by lease file: runner/groups.py
    claimer = (groups.LeaseClaimer(plan.out, num_chunks=plan.index.num_chunks, tp_rank=ctx.tp_rank,
                                   tp_size=ctx.tp_size, tp_group=ctx.tp_cpu_group, stop=stop,
                                   timeout_s=plan.spec.lease_timeout_s, log=log) if independent else
               ChunkClaimer(ctx.store, num_chunks=plan.index.num_chunks,
                            is_done=lambda k: parts.is_done(plan.out, k), tp_rank=ctx.tp_rank,
                            tp_size=ctx.tp_size, tp_group=ctx.tp_cpu_group, stop=stop))
    t0 = time.monotonic()
    failed = False
    try:
        group = groups.work_until_done(plan, llm, claimer, _work) if independent else _work(plan, llm, claimer)
        if ctx.is_tp_leader:
            ctx.store.set(keys.group_result(ctx.dp_rank), json.dumps(group))
        if ctx.rank == 0:
            code = (groups.finish_group(plan, claimer, time.monotonic() - t0) if independent
                    else finish_world(plan, ctx, watchdog, progress, time.monotonic() - t0))
            ctx.store.set(keys.FINAL, str(code))
        else:
            code = final_code(ctx.store, watchdog)
    except Exception as e:  # noqa: BLE001 - whatever failed, the other ranks must hear of it and stop
        code, failed = explain_failure(e, ctx, watchdog, plan.log), True
    finally:
        if progress is not None:
            progress.close()
        if independent:
            claimer.close()  # stop renewing at once: a failed group's chunks must go stale for the others
    watchdog.stop()
    if not failed:
        _leave(ctx)
    elif ctx.rank == 0 and ctx.world_size > 1:
        time.sleep(watchdog.linger_s)  # rank 0 hosts the store: let the others read why before it goes
    return code


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
             "cached_prompt_tokens": 0, "seconds": 0.0, "stopped": None}
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
            _write_chunk(plan, ctx, inflight.pop(k), stats, claimer)
            if TEST_CHUNK_DELAY_S:
                time.sleep(TEST_CHUNK_DELAY_S)
        if exhausted and not inflight:
            break
    stats["seconds"] = round(time.monotonic() - t0, 3)
    stats["stopped"] = claimer.stopped
    return stats


def _write_chunk(plan: JobPlan, ctx: Any, chunk: _Chunk, stats: dict[str, Any], claimer: Any) -> None:
    outs = [chunk.outputs[str(i)] for i in range(len(chunk.records))]
    tokens = sum(completion_tokens(o) for o in outs)
    if ctx.is_tp_leader:
        fmt = record_format(plan)
        results = [{"line": r.line, **fmt.result(r, o, sampling_for(r, plan.spec.sampling, plan.job_seed))}
                   for r, o in zip(chunk.records, outs)]
        claimer.write(plan.out, chunk.index, results, {
            "chunk": chunk.index, "records": len(results), "tokens": tokens,
            "seconds": round(time.monotonic() - chunk.started, 3), "group": ctx.dp_rank,
            "host": socket.gethostname(), "finished_at": time.time(),
        })
        ctx.store.add(keys.RECORDS_DONE, len(results))
        ctx.store.add(keys.TOKENS_DONE, tokens)
    stats["chunks"] += 1
    stats["records"] += len(outs)
    stats["tokens"] += tokens
    stats["cached_prompt_tokens"] += sum(o.num_cached_tokens for o in outs)


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
