"""Dynamic chunk claiming (tprun/runner/chunks.py) under torchrun with gloo TP groups and the job's store:
each chunk is handed out once, to every rank of one TP group; a faster group takes more; a stop raised
on one rank takes its whole group out at the same boundary and the other groups at their next one."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.runner_harness import ROOT, TORCHRUN, base_env, free_port

pytestmark = pytest.mark.slow


def claim(tmp_path, num_chunks: int, done: list[int] = (), stop_rank: int = -1, stop_after: int = -1):
    cmd = [str(TORCHRUN), "--nproc-per-node", "4", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           str(ROOT / "tests" / "chunks_check.py"), str(tmp_path), str(num_chunks), ",".join(map(str, done)),
           str(stop_rank), str(stop_after)]
    r = subprocess.run(cmd, check=False, env=base_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(4)]


def test_each_chunk_once_to_a_whole_group_and_the_faster_group_takes_more(tmp_path):
    ranks = claim(tmp_path, num_chunks=24, done=[0, 5, 6])
    fast, slow = ranks[0]["worked"], ranks[2]["worked"]
    assert ranks[1]["worked"] == fast and ranks[3]["worked"] == slow  # a group's ranks run the same chunks
    assert sorted(fast + slow) == [k for k in range(24) if k not in (0, 5, 6)]  # each once; done skipped
    assert len(slow) == 1  # group 1 was busy with its first chunk while group 0 took all the others
    assert all(r["stopped"] is None for r in ranks)


def test_stop_on_one_rank_stops_its_group_together_then_every_group(tmp_path):
    ranks = claim(tmp_path, num_chunks=200, stop_rank=3, stop_after=2)
    assert ranks[2]["worked"] == ranks[3]["worked"] and len(ranks[3]["worked"]) == 2
    assert ranks[0]["worked"] == ranks[1]["worked"]
    assert len(ranks[0]["worked"]) == 1  # group 0 stopped too, at the boundary after the stop
    assert ranks[3]["stopped"] == "test"
    assert ranks[2]["stopped"] == "a stop signal on another rank of this TP group"
    assert ranks[0]["stopped"] == "stop requested by another group"
