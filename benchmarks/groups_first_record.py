"""Time from submission to the first record, one world vs independent groups, when the cluster has fewer
free nodes than the job has groups (issue 13). Needs the local Slurm of scripts/slurm-up.sh (2 nodes).

    python benchmarks/groups_first_record.py [--groups 4] [--prompts 64] [--timeout 300]

Both jobs are TP=1 x DP=N over N nodes, one node each (`--exclusive`, so a node holds one group). The
one-world job needs all N nodes at once: on a cluster of 2 it never starts (Slurm refuses or queues it).
The independent job is an array of N tasks: 2 run at once, the others start as nodes free up, and every
task claims chunks from OUT as it comes. Prints seconds to the first done chunk and to _SUCCESS as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def spec(tmp: Path, model: Path, groups: str, n: int, out: Path) -> Path:
    data = {"name": f"bench-{groups}", "model": str(model), "input": str(tmp / "prompts.jsonl"), "output": str(out),
            "dtype": "float32", "chunk_size": 4, "lease_timeout_s": 20,
            "parallel": {"tensor_parallel_size": 1, "data_parallel_size": n, "groups": groups},
            "sampling": {"temperature": 0.0, "max_tokens": 32, "ignore_eos": True},
            "engine": {"max_num_seqs": 4},
            "resources": {"nodes": n, "procs_per_node": 1, "cpus_per_proc": 1},
            "slurm": {"time": "00:10:00", "extra_sbatch": ["--exclusive"]}}
    path = tmp / f"{groups}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def submit(script_text: str, tmp: Path, name: str) -> tuple[str | None, str]:
    script = tmp / f"{name}.sbatch"
    script.write_text(script_text)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp}/{name}-%A_%a.out", str(script)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    return (r.stdout.strip() or None), r.stderr.strip()


def watch(out: Path, t0: float, timeout: float) -> dict[str, float | None]:
    first = None
    while time.monotonic() - t0 < timeout:
        if first is None and list((out / "parts").glob("*.done")):
            first = time.monotonic() - t0
        if (out / "_SUCCESS").exists():
            return {"first_record_s": round(first or 0.0, 1), "complete_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.2)
    return {"first_record_s": None if first is None else round(first, 1), "complete_s": None}


def main() -> None:
    from tprun.cluster.slurm_render import render_sbatch
    from tprun.config import JobSpec

    ap = argparse.ArgumentParser()
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=120, help="seconds to watch each job")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tprun-groups-bench-"))
    model = tmp / "model"
    subprocess.run([sys.executable, "-m", "tprun", "demo-model", str(model)], check=True, capture_output=True,
                   timeout=120)
    (tmp / "prompts.jsonl").write_text("".join(json.dumps({"id": i, "prompt": f"Story number {i}:"}) + "\n"
                                               for i in range(args.prompts)))
    result: dict = {"groups": args.groups, "prompts": args.prompts,
                    "nodes": len(set(subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True,
                                                    text=True, timeout=30).stdout.split()))}
    for groups in ("one-world", "independent"):
        out = tmp / f"out-{groups}"
        path = spec(tmp, model, groups, args.groups, out)
        t0 = time.monotonic()
        job_id, err = submit(render_sbatch(JobSpec.from_yaml(path), str(path)), tmp, groups)
        if job_id is None:
            result[groups] = {"submitted": False, "sbatch": err}
            continue
        try:
            result[groups] = {"job": job_id, **watch(out, t0, args.timeout)}
            if result[groups]["complete_s"] is None:  # why Slurm has not run it
                result[groups]["squeue"] = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"],
                                                          capture_output=True, text=True, timeout=30).stdout.strip()
        finally:
            subprocess.run(["scancel", job_id], timeout=30, check=False)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
