"""Independent groups (`--groups independent`): TP groups that share nothing but the output directory.

One scenario, one set of launches, several assertions (the suite runs on 2 cores): three groups, each
its own `torchrun --nproc-per-node 2` (TP=2) started at a different time on one OUT, with a 3 s lease
timeout.
  - group 1 is frozen (SIGSTOP) while it holds a chunk, until another group has taken that chunk over;
    then it is let go on (SIGCONT): its late copy must be discarded, not published;
  - group 2 is killed (SIGKILL to its whole process group) while it holds chunks: their leases expire
    and the others redo them;
  - the results must equal the one-process reference run byte for byte (each id once), and group 2,
    restarted after the job is complete, exits 0 with nothing to do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import free_port
from tests.runner_harness import ROOT, TORCHRUN, alive, base_env, done_chunks, worker_pids
from tprun.runner import parts
from tprun.runner.exit_codes import EXIT_OK
from tprun.runner.leases import LEASES

pytestmark = pytest.mark.slow

LEASE_TIMEOUT = "3"
# A pause after each chunk and one record per chunk: the job lasts long enough for three staggered groups.
SLOW = {"TPRUN_TEST_CHUNK_DELAY_S": "1.5"}


@dataclass
class Group:
    index: int
    proc: subprocess.Popen
    log: Path

    def signal(self, sig: int) -> None:
        """To the torchrun agent and its workers (each of which torchrun starts in a session of its own)."""
        for pid in [*worker_pids(self.proc.pid).values(), self.proc.pid]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait_gone(self, timeout: float) -> None:
        workers = list(worker_pids(self.proc.pid).values())
        self.proc.wait(timeout=timeout)
        deadline = time.monotonic() + timeout
        while any(alive(pid) for pid in workers):
            assert time.monotonic() < deadline, f"group {self.index}'s workers outlived it"
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_group(job, out: Path, index: int, log_dir: Path) -> Group:
    log = log_dir / f"group{index}.log"
    args = job.args(out, "--tp", "2", "--chunk-size", "1", "--groups", "independent", "--group-index", str(index),
                    "--lease-timeout", LEASE_TIMEOUT)
    cmd = [str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "tprun", "run", *args]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, env=base_env(**SLOW), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Group(index, proc, log)


def lease_holders(out: Path) -> dict[int, tuple[int, int]]:
    """chunk -> (group, generation) of the newest lease of every chunk not done yet."""
    held: dict[int, tuple[int, int]] = {}
    done = set(done_chunks(out))
    for p in (out / LEASES).glob("chunk-*.*"):
        if p.name.startswith("."):
            continue
        k, gen = int(p.stem.split("-")[1]), int(p.suffix[1:])
        if k in done or gen < held.get(k, (0, -1))[1]:
            continue
        try:
            held[k] = (json.loads(p.read_text())["group"], gen)
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            continue
    return held


def wait_until(predicate, timeout: float, what: str, groups: list[Group]):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            for g in groups:
                if g.proc.poll() is None:
                    g.signal(signal.SIGKILL)
            logs = "\n".join(f"--- group {g.index} ---\n{g.output()[-3000:]}" for g in groups)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")
        time.sleep(0.05)


@dataclass
class Scenario:
    out: Path
    codes: dict[int, int]
    logs: dict[int, str]
    frozen_chunk: int
    killed_chunks: list[int]
    restart: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def scenario(reference_job, tmp_path_factory) -> Scenario:
    base = tmp_path_factory.mktemp("groups")
    out = base / "out"
    groups: list[Group] = []
    try:
        groups.append(start_group(reference_job, out, 0, base))
        wait_until(lambda: done_chunks(out), 180, "group 0's first chunk", groups)
        groups.append(start_group(reference_job, out, 1, base))

        # Freeze group 1 while it holds an unfinished chunk, until another group has taken that chunk over.
        def held_by(g: int) -> list[int]:
            return sorted(k for k, (holder, _) in lease_holders(out).items() if holder == g)

        while True:
            wait_until(lambda: held_by(1), 180, "group 1 to hold a chunk", groups)
            groups[1].signal(signal.SIGSTOP)
            time.sleep(0.2)  # a write in flight when the signal landed is visible now
            if held_by(1):
                frozen = held_by(1)[0]
                break
            groups[1].signal(signal.SIGCONT)  # it finished the chunk just before it froze: again
        groups.append(start_group(reference_job, out, 2, base))  # the third starts while group 1 is frozen
        wait_until(lambda: frozen in done_chunks(out) or lease_holders(out).get(frozen, (1, 0))[0] != 1,
                   120, f"chunk {frozen} to be taken over from the frozen group 1", groups)
        groups[1].signal(signal.SIGCONT)

        # Kill group 2 outright while it holds chunks.
        wait_until(lambda: held_by(2), 180, "group 2 to hold a chunk", groups)
        groups[2].signal(signal.SIGKILL)
        groups[2].wait_gone(timeout=30)
        killed = held_by(2)  # unfinished when it died

        for g in groups[:2]:
            g.proc.wait(timeout=240)
        codes = {g.index: g.proc.returncode for g in groups}
        logs = {g.index: g.output() for g in groups}
    finally:
        for g in groups:
            if g.proc.poll() is None:
                g.signal(signal.SIGKILL)
                g.proc.wait(timeout=30)
    t0 = time.monotonic()
    again = start_group(reference_job, out, 2, base)  # group 2 restarted after the job is complete
    again.proc.wait(timeout=120)
    restart = subprocess.CompletedProcess([], again.proc.returncode, again.output(), f"{time.monotonic() - t0:.1f}")
    return Scenario(out, codes, logs, frozen, killed, restart)


def test_staggered_groups_give_the_one_process_results_byte_for_byte(scenario, reference_job):
    assert scenario.codes[0] == EXIT_OK and scenario.codes[1] == EXIT_OK, scenario.logs
    assert (scenario.out / parts.SUCCESS).exists()
    text = (scenario.out / parts.RESULTS).read_text()
    ids = Counter(json.loads(line)["id"] for line in text.splitlines())
    assert len(ids) == reference_job.num_records and set(ids.values()) == {1}
    assert text == reference_job.results
    summary = json.loads((scenario.out / parts.SUMMARY).read_text())
    assert sum(g["chunks"] for g in summary["groups"]) == reference_job.num_records  # each chunk once
    assert {g["group"] for g in summary["groups"]} <= {0, 1, 2} and 0 in {g["group"] for g in summary["groups"]}


def test_a_killed_groups_chunks_are_redone_by_the_others(scenario):
    assert scenario.codes[2] == -signal.SIGKILL
    assert scenario.killed_chunks, "group 2 held no unfinished chunk when it was killed"
    for k in scenario.killed_chunks:
        done = parts.read_done(scenario.out, k)
        assert done["group"] in (0, 1), (k, done)
        # taken over: a newer generation of its lease than group 2's
        assert (scenario.out / LEASES / f"chunk-{k:06d}.1").exists()
    assert "taking over chunk" in scenario.logs[0] + scenario.logs[1]


def test_a_frozen_group_that_lost_its_lease_publishes_no_duplicate(scenario):
    k = scenario.frozen_chunk
    # Another group took the chunk over while group 1 was frozen. That group usually publishes it; when the
    # freeze landed between group 1's last lease check and its done marker, group 1's copy takes the
    # exclusive marker on waking instead (leases.py: the marker, not the lease, makes results exactly-once).
    assert (scenario.out / LEASES / f"chunk-{k:06d}.1").exists()
    # exactly one part per chunk, the one its done marker names: the frozen group's copy is gone
    published = sorted((scenario.out / parts.PARTS).glob("chunk-*.jsonl"))
    assert len(published) == len(done_chunks(scenario.out))
    assert all(parts.published_part(scenario.out, int(p.name.split(".")[0].split("-")[1])) == p for p in published)


def test_a_group_restarted_after_the_job_is_complete_exits_0_with_nothing_to_do(scenario):
    assert scenario.restart.returncode == EXIT_OK, scenario.restart.stdout
    assert "nothing to do" in scenario.restart.stdout
