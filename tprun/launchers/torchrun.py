"""torchrun (torch.distributed.run) and anything else that exports its variables."""

from __future__ import annotations

from tprun.launchers.base import Launcher


class TorchrunLauncher(Launcher):
    name = "torchrun"
    env = {
        "rank": "RANK",
        "local_rank": "LOCAL_RANK",
        "world_size": "WORLD_SIZE",
        "local_world_size": "LOCAL_WORLD_SIZE",
        "master_addr": "MASTER_ADDR",
        "master_port": "MASTER_PORT",
    }
    required = ("RANK", "WORLD_SIZE", "MASTER_ADDR")

    @property
    def local_rank(self) -> int:
        return self._int("local_rank", default=self.rank)

    @property
    def local_world_size(self) -> int:
        return self._int("local_world_size", default=self.world_size)

    @property
    def master_port(self) -> int:
        return self._int("master_port", default=29500)

    def distributed_args(self):
        from dataclasses import replace

        hosted = self.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        return replace(super().distributed_args(), store_hosted_by_launcher=hosted)
