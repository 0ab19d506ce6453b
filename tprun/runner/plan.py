"""What one rank decides from local files alone, before the engine's rendezvous.

Every rank reads the same files and runs the same checks, so a bad job fails on every rank at once with
the same message (exit 2 or 3), instead of some ranks failing and the rest waiting for them in a
rendezvous until its timeout. Nothing is written here except, on rank 0, errors.jsonl of an input
that --on-bad-input fail rejects.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tprun.config import JobSpec
from tprun.runner import manifest, parts
from tprun.runner.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from tprun.runner.inputs import InputIndex, scan_input
from tprun.runner.preflight import JobError, check_input, check_model, check_output, check_world
from tprun.runner.records import format_for


class Log:
    def __init__(self, rank: int, world_size: int) -> None:
        self.prefix = "tprun: " if world_size == 1 else f"tprun[rank {rank}]: "

    def __call__(self, msg: str) -> None:
        print(self.prefix + msg, file=sys.stderr, flush=True)


@dataclass
class JobPlan:
    spec: JobSpec
    out: Path
    rank: int
    world_size: int
    vocab_size: int | None
    index: InputIndex
    identity: dict[str, Any]  # what OUT/manifest.json fingerprints
    state: manifest.State
    log: Log
    job_seed: int = 0


def launch_args() -> tuple[Any, Any]:
    """(launcher, DistributedArgs) of this process; JobError when the launcher's environment is wrong."""
    from tprun.launchers import LauncherError, detect_launcher

    try:
        launcher = detect_launcher()
        return launcher, launcher.distributed_args()
    except LauncherError as e:
        raise JobError(str(e)) from None


def plan_job(spec: JobSpec, overwrite: bool, dargs: Any, log: Log) -> JobPlan | int:
    """The plan, or the exit code when the job ends here (nothing to do, or rejected input).

    Raises JobError for a job that cannot run as specified."""
    from pydantic import ValidationError

    check_world(spec, dargs.world_size, dargs.launcher)
    try:
        engine_config = spec.engine_config()
    except ValidationError as e:
        raise JobError(f"invalid engine settings: {e}") from None
    check_input(spec.input)
    model = check_model(spec.model)
    check_output(spec.output)
    out = Path(spec.output)
    try:
        index = scan_input(spec.input, spec.chunk_size, spec.sampling, model.vocab_size, spec.input_format)
    except OSError as e:
        raise JobError(f"cannot read input {spec.input}: {e.strerror}") from None
    identity = manifest.job_identity(spec, index.sha256, index.num_lines, model.identity)
    state = manifest.check(out, identity, overwrite)
    if state == "complete":
        if dargs.rank == 0:
            log(f"{out} already holds this job's complete results ({out / parts.SUCCESS} exists); "
                "nothing to do")
        return EXIT_OK

    if index.errors:
        shown = "\n  ".join(str(e) for e in index.errors[:5])
        more = f"\n  ... and {len(index.errors) - 5} more" if len(index.errors) > 5 else ""
        if spec.on_bad_input == "fail" or index.num_records == 0:
            if dargs.rank == 0:
                fmt = format_for(index.format, identity, out, spec.model)
                parts.write_errors(out, [fmt.line_error(e) for e in index.errors])
            why = ("--on-bad-input fail" if index.num_records
                   else f"none of the {index.num_lines} lines is a valid record")
            log(f"error: {len(index.errors)} bad input line(s) in {spec.input} ({why}); all listed in "
                f"{out / parts.ERRORS}:\n  {shown}{more}")
            return EXIT_BAD_INPUT
        if dargs.rank == 0:
            log(f"skipping {len(index.errors)} bad input line(s) (listed in {out / parts.ERRORS} at the end):"
                f"\n  {shown}{more}")
    elif index.num_records == 0:
        log(f"error: input {spec.input} has no records")
        return EXIT_BAD_INPUT

    return JobPlan(spec=spec, out=out, rank=dargs.rank, world_size=dargs.world_size,
                 vocab_size=model.vocab_size, index=index, identity=identity, state=state, log=log,
                 job_seed=engine_config.seed)
