"""Kubernetes Indexed Job and LeaderWorkerSet environments -> one DistributedArgs per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.k8s_pods import pod_env
from tprun.cluster.k8s_render import render_manifests
from tprun.config import JobSpec
from tprun.launchers import LauncherError, detect_launcher

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# What a pod of a rendered Indexed Job sees (kubelet + Job controller + the manifest's env); the
# KUBERNETES_* variables are injected into every pod whatever the manifest says.
CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "KUBERNETES_PORT": "tcp://10.96.0.1:443", "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp"}
JOB = {**CLUSTER, "HOSTNAME": "llama-1", "JOB_COMPLETION_INDEX": "1", "TPRUN_JOB_NAME": "llama",
       "TPRUN_SERVICE": "llama", "TPRUN_NAMESPACE": "inference",
       "TPRUN_NUM_PODS": "2", "TPRUN_PROCS_PER_POD": "1", "MASTER_PORT": "29500", "TPRUN_DNS_TIMEOUT_S": "300"}
# LWS 0.6+ on a leader pod `vllm-0` and a worker pod `vllm-0-1` of a group of 2.
LWS_LEADER = {**CLUSTER, "HOSTNAME": "vllm-0", "LWS_LEADER_ADDRESS": "vllm-0.vllm.default", "LWS_GROUP_SIZE": "2",
              "LWS_WORKER_INDEX": "0"}
LWS_WORKER = {**LWS_LEADER, "HOSTNAME": "vllm-0-1", "LWS_WORKER_INDEX": "1"}
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29400"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
         "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu-[1-2]", "SLURM_STEP_ID": "0"}


def args_of(env: dict) -> dict:
    d = detect_launcher(env).distributed_args().as_dict()
    return {k: d[k] for k in ("launcher", "rank", "local_rank", "world_size", "local_world_size", "master_addr",
                              "master_port")}


@pytest.mark.parametrize("index", [0, 1])
def test_rendered_indexed_job_gives_each_pod_its_rank_and_pod_zero_as_master(index):
    spec = JobSpec.from_yaml(ROOT / "examples" / "job.yaml")
    job = render_manifests(spec)[-1]
    env = pod_env(job, index, pod_name=f"tprun-demo-{index}-abcde", pod_ip=f"10.1.0.{index + 5}")
    assert args_of(env) == {"launcher": "kubernetes", "rank": index, "local_rank": 0, "world_size": 2,
                            "local_world_size": 1, "master_addr": "tprun-demo-0.tprun-demo.default.svc",
                            "master_port": 29500}


def test_rendered_job_with_four_processes_per_pod_fans_out_ranks_by_pod():
    spec = JobSpec.from_yaml(ROOT / "examples" / "job.yaml").model_copy(deep=True)
    spec.parallel.tensor_parallel_size, spec.parallel.data_parallel_size = 4, 2
    spec.resources.procs_per_node, spec.resources.gpus_per_node = 4, 4
    job = render_manifests(spec)[-1]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][:5] == [
        "python3", "-m", "tprun.launchers.fanout", "--nprocs", "4"]
    ranks = []
    for index in range(2):
        env = pod_env(job, index, pod_name=f"p{index}", pod_ip="10.1.0.9")
        for local in range(4):  # what the fan-out adds for its i-th child
            ranks.append(args_of({**env, "TPRUN_LOCAL_RANK": str(local)}))
    assert [a["rank"] for a in ranks] == list(range(8))
    assert {(a["world_size"], a["local_world_size"]) for a in ranks} == {(8, 4)}
    assert [a["local_rank"] for a in ranks] == [0, 1, 2, 3] * 2


SNAPSHOTS = {
    "indexed-job pod 1 of 2": (JOB, {"launcher": "kubernetes", "rank": 1, "local_rank": 0, "world_size": 2,
                                     "local_world_size": 1, "master_addr": "llama-0.llama.inference.svc",
                                     "master_port": 29500}),
    "indexed-job 4 procs per pod, pod 1 process 3": (
        {**JOB, "TPRUN_PROCS_PER_POD": "4", "TPRUN_LOCAL_RANK": "3", "MASTER_PORT": "23456"},
        {"launcher": "kubernetes", "rank": 7, "local_rank": 3, "world_size": 8, "local_world_size": 4,
         "master_addr": "llama-0.llama.inference.svc", "master_port": 23456}),
    "indexed-job without namespace uses the short name": (
        {k: v for k, v in JOB.items() if k not in ("TPRUN_NAMESPACE", "MASTER_PORT")},
        {"launcher": "kubernetes", "rank": 1, "local_rank": 0, "world_size": 2, "local_world_size": 1,
         "master_addr": "llama-0.llama", "master_port": 29500}),
    "lws leader": (LWS_LEADER, {"launcher": "lws", "rank": 0, "local_rank": 0, "world_size": 2,
                                "local_world_size": 1, "master_addr": "vllm-0.vllm.default", "master_port": 29500}),
    "lws worker": (LWS_WORKER, {"launcher": "lws", "rank": 1, "local_rank": 0, "world_size": 2,
                                "local_world_size": 1, "master_addr": "vllm-0.vllm.default", "master_port": 29500}),
    "lws worker with 8 procs per pod": (
        {**LWS_WORKER, "TPRUN_PROCS_PER_POD": "8", "TPRUN_LOCAL_RANK": "5"},
        {"launcher": "lws", "rank": 13, "local_rank": 5, "world_size": 16, "local_world_size": 8,
         "master_addr": "vllm-0.vllm.default", "master_port": 29500}),
}


@pytest.mark.parametrize("name", SNAPSHOTS)
def test_environment_snapshot_gives_distributed_args(name):
    env, want = SNAPSHOTS[name]
    assert args_of(env) == want


@pytest.mark.parametrize(("env", "launcher"), [
    ({**JOB, **TORCHRUN}, "torchrun"),  # torchrun started inside a pod: its variables win
    ({**LWS_WORKER, "JOB_COMPLETION_INDEX": "0"}, "lws"),
    ({**JOB, **SLURM}, "kubernetes"),
    ({**LWS_WORKER, **SLURM}, "lws"),
], ids=["torchrun>kubernetes", "lws>kubernetes", "kubernetes>slurm", "lws>slurm"])
def test_launcher_precedence(env, launcher):
    assert detect_launcher(env).name == launcher


@pytest.mark.parametrize(("env", "message"), [
    ({**JOB, "JOB_COMPLETION_INDEX": "2"}, "JOB_COMPLETION_INDEX=2 is outside the 2 pods (TPRUN_NUM_PODS)"),
    ({k: v for k, v in JOB.items() if k != "TPRUN_NUM_PODS"},
     "TPRUN_NUM_PODS (num_pods) is not set; the Job manifest from `tprun render k8s SPEC` sets it"),
    ({k: v for k, v in JOB.items() if k != "TPRUN_SERVICE"}, "TPRUN_SERVICE (service) is not set"),
    ({**JOB, "TPRUN_LOCAL_RANK": "1"}, "TPRUN_LOCAL_RANK=1 is outside the 1 processes of this pod"),
    ({**JOB, "TPRUN_PROCS_PER_POD": "0"}, "TPRUN_PROCS_PER_POD=0 must be >= 1"),
    ({**JOB, "JOB_COMPLETION_INDEX": "one"}, "JOB_COMPLETION_INDEX='one' (pod_index) is not an integer"),
    ({**LWS_WORKER, "LWS_GROUP_SIZE": "0"}, "LWS_GROUP_SIZE=0 must be >= 1"),
    ({k: v for k, v in LWS_WORKER.items() if k != "LWS_WORKER_INDEX"},
     "LWS_WORKER_INDEX (pod_index) is not set; LWS sets LWS_WORKER_INDEX from 0.6 on; on older LWS add it"),
], ids=["index>=pods", "no-num-pods", "no-service", "local-rank>=procs", "zero-procs", "index-not-int",
        "lws-empty-group", "lws-no-worker-index"])
def test_impossible_environment_is_a_clear_error(env, message):
    with pytest.raises(LauncherError) as e:
        detect_launcher(env).distributed_args()
    assert message in str(e.value)


def test_tprun_env_never_waits_for_dns():
    """`tprun env` reports what the pod would do; only the executor waits for the master's name."""
    env = {**os.environ, **{k: v for k, v in JOB.items() if k not in ("PATH", "HOME")},
           "TPRUN_JOB_NAME": "no-such-job"}
    t0 = time.monotonic()
    out = subprocess.run([PY, "-m", "tprun", "env", "--json"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert time.monotonic() - t0 < 30
    info = json.loads(out)
    assert (info["launcher"], info["rank"], info["master_addr"]) == ("kubernetes", 1,
                                                                      "no-such-job-0.llama.inference.svc")


# --- waiting for the master's DNS name: real lookups in a mount namespace with its own /etc/hosts ---

RESOLVE = """
import json, os, sys, time
from tprun.launchers import detect_launcher
t0 = time.monotonic()
try:
    detect_launcher().resolve_master(float(sys.argv[1]))
    print(json.dumps({"ok": True, "s": time.monotonic() - t0}))
except Exception as e:
    print(json.dumps({"ok": False, "s": time.monotonic() - t0, "error": f"{type(e).__name__}: {e}"}))
"""


def _needs_namespaces():
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace (/etc/hosts of our own)")


def _resolve_in_namespace(tmp_path: Path, env: dict, arg_timeout: float, hosts: Path,
                          timeout: float = 120) -> subprocess.Popen:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("options ndots:1 attempts:1 timeout:1\n")  # no nameserver: only the hosts file answers
    script = f'mount --bind {hosts} /etc/hosts && mount --bind {resolv} /etc/resolv.conf && exec "$@"'
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
         PY, "-c", RESOLVE, str(arg_timeout)],
        env={**os.environ, **{k: v for k, v in env.items() if k not in ("PATH", "HOME")}},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_master_name_published_20s_late_still_resolves(tmp_path):
    _needs_namespaces()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    proc = _resolve_in_namespace(tmp_path, {**JOB, "TPRUN_DNS_TIMEOUT_S": "90"}, 1.0, hosts)
    timer = threading.Timer(20.0, lambda: hosts.open("a").write("10.1.0.5\tllama-0.llama.inference.svc\n"))
    timer.start()
    try:
        result = _result(proc, timeout=120)
    finally:
        timer.cancel()
        proc.kill()
    # Waited for the record (the job's own TPRUN_DNS_TIMEOUT_S, not the caller's 1 s) and got it soon after.
    assert result["ok"], result
    assert 20.0 <= result["s"] < 30.0


def test_master_name_that_never_resolves_fails_naming_the_host(tmp_path):
    _needs_namespaces()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    proc = _resolve_in_namespace(tmp_path, {**JOB, "TPRUN_DNS_TIMEOUT_S": "2"}, 300.0, hosts)
    result = _result(proc, timeout=60)
    assert not result["ok"]
    assert 2.0 <= result["s"] < 10.0
    assert "LauncherError" in result["error"]
    assert "'llama-0.llama.inference.svc' did not resolve within 2 s" in result["error"]
    assert "headless Service 'llama'" in result["error"]


def test_lws_leader_address_waits_like_an_indexed_job(tmp_path):
    _needs_namespaces()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n")
    proc = _resolve_in_namespace(tmp_path, {**LWS_WORKER, "TPRUN_DNS_TIMEOUT_S": "60"}, 1.0, hosts)
    time.sleep(2.0)
    with hosts.open("a") as f:
        f.write("10.1.0.7\tvllm-0.vllm.default\n")
    try:
        result = _result(proc, timeout=60)
    finally:
        proc.kill()
    assert result["ok"], result
    assert result["s"] >= 2.0


def test_documented_example_snapshot_matches_rendered_env_names():
    """The hand-written snapshot above uses exactly the variable names the renderer sets."""
    job = render_manifests(JobSpec.from_yaml(ROOT / "examples" / "job.yaml"))[-1]
    rendered = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    tprun_vars = {k for k in JOB if k.startswith("TPRUN_") or k == "MASTER_PORT"}
    assert tprun_vars <= rendered, tprun_vars - rendered
