"""Exit codes of `tprun run`, chosen so a cluster can tell "retry" from "fix the job".

    0   EXIT_OK            every record done; OUT/_SUCCESS written
    1   EXIT_FAILED        this rank failed (engine error, divergence, crash); its message says why
    2   EXIT_JOB_ERROR     the job as specified cannot run (missing input/model, corrupt weights, output not
                           writable, world != tp * dp, another job's output dir); fix it, do not retry
    3   EXIT_BAD_INPUT     --on-bad-input fail and the input has bad lines (listed in OUT/errors.jsonl),
                           or no line of the input is a valid record
    75  EXIT_REQUEUE       stopped by a signal (preemption) before all chunks were done; rerun the same
                           command to resume (75 is EX_TEMPFAIL of sysexits.h: "try again later")
    76  EXIT_PEER_FAILED   another rank died, hung or failed; this rank stopped so the job does not hang;
                           a rerun resumes (if the peer's failure was deterministic, its own code says so)
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_JOB_ERROR = 2
EXIT_BAD_INPUT = 3
EXIT_REQUEUE = 75
EXIT_PEER_FAILED = 76

EXIT_CODES = frozenset({EXIT_OK, EXIT_FAILED, EXIT_JOB_ERROR, EXIT_BAD_INPUT, EXIT_REQUEUE, EXIT_PEER_FAILED})
RETRYABLE = frozenset({EXIT_REQUEUE, EXIT_PEER_FAILED})
