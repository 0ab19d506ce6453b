"""Several processes in one pod: `python3 -m tprun.launchers.fanout -n N -- tprun run SPEC`.

Starts N copies of the command with TPRUN_LOCAL_RANK=0..N-1 (the pod launchers read it). A TP group
is all-or-nothing, so the first child to fail takes the others down and its exit code becomes the
pod's; SIGTERM (preemption, `kubectl delete`) is passed on to every child.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0


def fan_out(argv: list[str], nprocs: int, grace_s: float = GRACE_S) -> int:
    children = [
        subprocess.Popen(argv, env={**os.environ, "TPRUN_LOCAL_RANK": str(i)}) for i in range(nprocs)
    ]

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        while True:
            codes = [child.poll() for child in children]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                _stop(children, grace_s)
                return _exit_code(failed[0])
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _stop(children, grace_s)


def _stop(children: list[subprocess.Popen], grace_s: float) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def _exit_code(returncode: int) -> int:
    # A child killed by signal N reports -N; a shell would report 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tprun.launchers.fanout", description=__doc__)
    parser.add_argument("-n", "--nprocs", type=int, required=True, help="processes to start")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if ns.nprocs < 1:
        parser.error(f"--nprocs must be >= 1, got {ns.nprocs}")
    if not command:
        parser.error("give the command after --, e.g. -- tprun run /etc/tprun/job.yaml")
    return fan_out(command, ns.nprocs)


if __name__ == "__main__":
    sys.exit(main())
