"""Run `tprun run` the ways a cluster does, for the job-runner tests.

`launch_ranks` starts one process per rank with the variables torchrun exports, but without torchrun's
agent: the agent would kill the survivors of a dead rank itself and hide each rank's own exit code,
which is exactly what the runner's no-hang and requeue behaviour must be judged by.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.procs import child_env, free_port, run

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")


PROMPTS = [
    "the quick brown fox", "jumps over a lazy dog", "while seven small birds", "sing in the old tree",
    "once upon a time there was", "a", "hello world", "the rain in spain falls mainly on the plain",
    "one two three four five six", "tprun",
]


def job_rows(n: int) -> list[dict]:
    """n records of every prompt kind and different lengths; one with its own max_tokens."""
    rows = [{"id": f"r{i}", "prompt": PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS))} for i in range(n)]
    rows[5 % n] = {"id": f"r{5 % n}", "prompt_token_ids": [3, 50, 70, 90, 110]}
    rows[9 % n] = {"id": f"r{9 % n}", "messages": [{"role": "user", "content": "sing a song"}]}
    rows[13 % n]["max_tokens"] = 4
    return rows


# Seeded sampling (not greedy) so that a record's tokens depend on its seed: only per-record seeds make
# them independent of chunking and of the DP group that ran it. float64: TP changes only the order of
# float64 partial sums, so results compare exactly.
# A batch of 4 requests keeps only a couple of chunks in flight, so chunks finish one after another and
# the tests can interrupt a job between them.
SAMPLING = ("--dtype", "float64", "--temperature", "0.8", "--top-p", "0.9", "--max-tokens", "12", "--ignore-eos",
            "--seed", "7", "--engine", "max_num_seqs=4")


@dataclass(frozen=True)
class ReferenceJob:
    model: Path
    input: Path
    results: str  # results.jsonl of the job run in one process, uninterrupted
    num_records: int

    def args(self, out: Path, *extra: str) -> list[str]:
        return run_args(self.model, self.input, out, *SAMPLING, *extra)


base_env = child_env  # the name the runner tests use


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (written as JSON) or str/bytes (written verbatim, for malformed lines)."""
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            elif isinstance(row, str):
                f.write(row.encode() + b"\n")
            else:
                f.write(json.dumps(row).encode() + b"\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_args(model: Path, inp: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--input", str(inp), "--output", str(out), "--quiet", *extra]


def run_cli(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`python -m tprun run ARGS` as a single process."""
    return run([sys.executable, "-m", "tprun", "run", *args], timeout, base_env(**env), cwd=ROOT)


def run_torchrun(nproc: int, args: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "tprun", "run", *args]
    return run(cmd, timeout, base_env(**env), cwd=ROOT)


@dataclass
class Ranks:
    procs: list[subprocess.Popen]
    logs: list[Path]

    def wait(self, timeout: float) -> list[float]:
        """Wait for every rank; returns each one's exit time (seconds from now). Kills all on timeout."""
        t0 = time.monotonic()
        ended: dict[int, float] = {}
        while len(ended) < len(self.procs):
            for r, p in enumerate(self.procs):
                if r not in ended and p.poll() is not None:
                    ended[r] = time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                self.kill()
                raise AssertionError(f"ranks {sorted(set(range(len(self.procs))) - set(ended))} still running "
                                     f"after {timeout:.0f} s\n{self.output()}")
            time.sleep(0.1)
        return [ended[r] for r in range(len(self.procs))]

    @property
    def codes(self) -> list[int | None]:
        return [p.returncode for p in self.procs]

    def signal(self, sig: int, ranks: list[int] | None = None) -> None:
        for r in range(len(self.procs)) if ranks is None else ranks:
            if self.procs[r].poll() is None:
                self.procs[r].send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)

    def output(self, rank: int | None = None) -> str:
        ranks = range(len(self.logs)) if rank is None else [rank]
        return "\n".join(f"--- rank {r} ---\n{self.logs[r].read_text(errors='replace')}" for r in ranks)


def launch_ranks(world: int, args: list[str], log_dir: Path, wrap: dict[int, list[str]] | None = None,
                 **env: str) -> Ranks:
    """wrap: a command prefix per rank (e.g. `unshare -m ...` to give one rank its own view of a path)."""
    port = free_port()
    procs, logs = [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world):
        log = log_dir / f"rank{r}.log"
        rank_env = base_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
        with open(log, "wb") as f:
            cmd = [*(wrap or {}).get(r, []), sys.executable, "-m", "tprun", "run", *args]
            procs.append(subprocess.Popen(cmd, env=rank_env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    return Ranks(procs, logs)


def start_torchrun(nproc: int, args: list[str], log: Path, torchrun_args: tuple[str, ...] = (),
                   **env: str) -> subprocess.Popen:
    cmd = [str(TORCHRUN), "--nproc-per-node", str(nproc), *torchrun_args, "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "tprun", "run", *args]
    with open(log, "wb") as f:
        return subprocess.Popen(cmd, env=base_env(**env), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)


def worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun agent started (its children, by their RANK variable)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(stat.parent.name)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def private_dir(path: Path, fill_from: Path | None = None) -> list[str]:
    """A `wrap` prefix: the rank sees an empty tmpfs at `path` (a node without the shared filesystem),
    holding a copy of `fill_from`'s files if given."""
    script = 'mount -t tmpfs tprun-test "$0" && { [ -z "$1" ] || cp -r "$1"/. "$0"; } && shift && exec "$@"'
    return ["unshare", "--mount", "sh", "-c", script, str(path), str(fill_from or "")]


def wait_for(predicate, timeout: float, what: str, ranks: Ranks | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if ranks is not None and any(c is not None for c in (p.poll() for p in ranks.procs)):
            raise AssertionError(f"a rank exited while waiting for {what}: {ranks.codes}\n{ranks.output()}")
        if time.monotonic() > deadline:
            if ranks is not None:
                ranks.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def done_chunks(out: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (out / "parts").glob("chunk-*.done"))
