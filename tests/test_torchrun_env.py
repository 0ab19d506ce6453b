"""torchrun's variables -> DistributedArgs, and `tprun env --json` as users see it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.procs import ROOT, child_env
from tprun.launchers import LauncherError, distributed_args

# What torchrun 2.x exports to worker 3 of `torchrun --nnodes 2 --nproc-per-node 2` on the second node.
TORCHRUN_NODE1_WORKER = {
    "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
    "ROLE_RANK": "3", "MASTER_ADDR": "node0.cluster", "MASTER_PORT": "29400",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
}


def test_torchrun_worker_environment_maps_to_its_place_in_the_job():
    d = distributed_args(TORCHRUN_NODE1_WORKER)
    assert (d.launcher, d.rank, d.local_rank, d.world_size, d.local_world_size) == ("torchrun", 3, 1, 4, 2)
    assert d.init_method == "tcp://node0.cluster:29400"
    assert d.store_hosted_by_launcher, "torchrun's agent serves the store: rank 0 must not bind the port again"


def test_hand_set_rank_variables_without_torchrun_get_defaults_for_the_rest():
    d = distributed_args({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5"})
    assert (d.local_rank, d.local_world_size, d.master_port) == (1, 2, 29500)
    assert not d.store_hosted_by_launcher


def test_no_launcher_is_a_single_local_process():
    d = distributed_args({})
    assert (d.launcher, d.rank, d.world_size, d.master_addr) == ("local", 0, 1, "127.0.0.1")


@pytest.mark.parametrize("env, message", [
    ({"RANK": "4", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "rank 4 is outside the world of 4"),
    ({"RANK": "x", "WORLD_SIZE": "4", "MASTER_ADDR": "h"}, "RANK='x' (rank) is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "not a TCP port"),
])
def test_impossible_environments_are_clear_errors(env, message):
    with pytest.raises(LauncherError, match=message.replace("(", r"\(").replace(")", r"\)")):
        distributed_args(env)


def test_tprun_env_json_reports_what_the_adapters_detect():
    out = subprocess.run([sys.executable, "-m", "tprun", "env", "--json"], env=child_env(**TORCHRUN_NODE1_WORKER),
                         cwd=ROOT, capture_output=True, text=True, timeout=60, check=True).stdout
    info = json.loads(out)
    assert {k: info[k] for k in ("launcher", "rank", "local_rank", "world_size", "master_addr", "master_port",
                                 "init_method")} == {
        "launcher": "torchrun", "rank": 3, "local_rank": 1, "world_size": 4, "master_addr": "node0.cluster",
        "master_port": 29400, "init_method": "tcp://node0.cluster:29400"}


def test_tprun_env_rejects_rank_beyond_world_size():
    r = subprocess.run([sys.executable, "-m", "tprun", "env", "--json"],
                       env=child_env(RANK="2", WORLD_SIZE="2", MASTER_ADDR="h"), cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "rank 2 is outside the world of 2" in r.stderr
