"""Launcher adapters: each reads its launcher's environment and yields one DistributedArgs.

Detection order matters: explicit torchrun variables win (a user may run torchrun inside a Slurm
allocation), then the more specific cluster launchers, then a single local process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from tprun.launchers.base import DistributedArgs, Launcher, LauncherError
from tprun.launchers.kubernetes import KubernetesLauncher
from tprun.launchers.local import LocalLauncher
from tprun.launchers.lws import LWSLauncher
from tprun.launchers.slurm import SlurmLauncher
from tprun.launchers.torchrun import TorchrunLauncher

LAUNCHERS: list[type[Launcher]] = [
    TorchrunLauncher, LWSLauncher, KubernetesLauncher, SlurmLauncher, LocalLauncher,
]


def detect_launcher(environ: Mapping[str, str] | None = None) -> Launcher:
    environ = dict(os.environ if environ is None else environ)
    for cls in LAUNCHERS:
        if cls.matches(environ):
            return cls(environ)
    raise LauncherError("no launcher matched the environment")  # LocalLauncher always matches


def distributed_args(environ: Mapping[str, str] | None = None) -> DistributedArgs:
    return detect_launcher(environ).distributed_args()


__all__ = ["DistributedArgs", "Launcher", "LauncherError", "LAUNCHERS", "detect_launcher", "distributed_args"]
