"""Names of the keys this runner keeps in the job's store (one place, so no two modules collide)."""

import os

# torchrun's agent hosts the store and keeps it across restart attempts (--max-restarts): an attempt
# must not read the previous attempt's chunk counter or verdict.
PREFIX = f"tprun/job/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
NEXT_CHUNK = PREFIX + "next_chunk"  # counter: chunks handed out so far
STOP = PREFIX + "stop"  # set by a group that got a stop signal: every group stops at its next boundary
ABORT = PREFIX + "abort"  # set by a rank that failed or saw a peer die: the reason
FINAL = PREFIX + "final"  # set by rank 0 when the job is over: the exit code for every rank
ACKS = PREFIX + "acks"  # counter: ranks that read FINAL and will no longer touch the store
RECORDS_DONE = PREFIX + "records_done"  # counters for rank 0's progress bar
TOKENS_DONE = PREFIX + "tokens_done"


def heartbeat(rank: int) -> str:
    return f"{PREFIX}heartbeat/{rank}"


def group_result(group: int) -> str:
    return f"{PREFIX}group/{group}"
