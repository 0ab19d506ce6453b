"""The job runner behind `tprun run`: a JSONL file in, OUT/results.jsonl out, resumable, DP x TP."""

from tprun.runner.exit_codes import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_JOB_ERROR, EXIT_OK, EXIT_PEER_FAILED, EXIT_REQUEUE

__all__ = ["EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_JOB_ERROR", "EXIT_OK", "EXIT_PEER_FAILED", "EXIT_REQUEUE", "run_job"]


def __getattr__(name: str):
    if name == "run_job":  # the job imports torch: only when asked for
        from tprun.runner.job import run_job

        return run_job
    raise AttributeError(name)
