"""The in-rank side (tprun/launchers/) stands alone: it never pulls in the submit host's side
(tprun/cluster/), the job runner, the engine or the workers, so a rank's environment adapter cannot come
to depend on what only the submit host has (kubernetes client, submitit) or on what imports it."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import tprun.launchers

FORBIDDEN = ("tprun.cluster", "tprun.runner", "tprun.engine", "tprun.worker", "tprun.executor", "tprun.cli",
             "kubernetes", "submitit")


def test_launchers_import_nothing_of_the_client_side_or_the_runner():
    mods = sorted(f"tprun.launchers.{m.name}" for m in pkgutil.iter_modules(tprun.launchers.__path__))
    assert {"tprun.launchers.lws", "tprun.launchers.slurm", "tprun.launchers.fanout"} <= set(mods)
    # `import tprun` itself loads tprun.config (JobSpec, with the cluster option models) and tprun.submit
    # for the package's public names; what counts is what the adapters add on top of that.
    code = ("import importlib, json, sys, tprun\n"
            "before = set(sys.modules)\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                       text=True, timeout=60).stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"tprun.launchers imports {bad}"


def test_cluster_side_is_not_left_in_launchers():
    names = {m.name for m in pkgutil.iter_modules(tprun.launchers.__path__)}
    assert not names & {"slurm_render", "slurm_submit", "k8s_render", "k8s_submit", "k8s_checks",
                        "k8s_network", "handle"}


def test_the_runner_loads_only_the_option_models_of_the_cluster_side():
    """A rank runs the runner: of tprun/cluster/ it may load JobSpec's option models, nothing that renders,
    submits or talks to a cluster (nor their clients)."""
    code = ("import json, sys\n"
            "import tprun.runner.job, tprun.runner.groups, tprun.runner.leases\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                                       timeout=120).stdout)
    cluster = {m for m in loaded if m.startswith("tprun.cluster.")}
    assert cluster <= {"tprun.cluster.options", "tprun.cluster.spec_rules", "tprun.cluster.handle"}, cluster
    assert not [m for m in loaded if m.split(".")[0] in ("kubernetes", "submitit")]
