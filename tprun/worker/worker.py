"""One worker per process: device, process groups, model, KV cache, and the step it runs."""

from __future__ import annotations

import datetime
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from tprun.config import EngineConfig
from tprun.worker.device import resolve_dtype, select_device
from tprun.worker.distributed import DistContext, init_distributed, shutdown_distributed
from tprun.worker.divergence import DivergenceDetector
from tprun.worker.model_runner import ModelRunner
from tprun.worker.models import check_supported
from tprun.worker.parallel import TPGroup
from tprun.worker.sampled_step import SampledStep
from tprun.worker.step import SamplerOutput, StepInput


@dataclass(frozen=True)
class ReconfigureDistributedRequest:
    new_master_addr: str
    new_master_port: int
    new_world_size: int
    new_rank: int
    new_local_rank: int | None = None


def load_hf_config(model_dir: str):
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model directory {model_dir} has no config.json; pass a Hugging Face checkpoint directory "
            "(e.g. one made by `tprun demo-model DIR`)"
        )
    return AutoConfig.from_pretrained(model_dir, local_files_only=True)


class Worker:
    def __init__(self, config: EngineConfig, dargs) -> None:
        self.config = config
        self.dargs = dargs
        self.hf_config = load_hf_config(config.model)
        check_supported(self.hf_config, config.parallel.tensor_parallel_size)
        self.device: torch.device | None = None
        self.dist: DistContext | None = None
        self.tp: TPGroup | None = None
        self.runner: ModelRunner | None = None
        self.divergence: DivergenceDetector | None = None

    @property
    def max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        return min(self.config.max_model_len or limit, limit)

    def init_device(self) -> None:
        self.device = select_device(self.config.device, self.dargs.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        p = self.config.parallel
        self.dist = init_distributed(self.dargs, backend, p.tensor_parallel_size, p.data_parallel_size,
                                     self.config.dist_timeout_s)
        if self.tp is None:
            self.tp = TPGroup(self.dist.tp_rank, self.dist.tp_size, self.dist.tp_group)
        else:  # reinitialisation: the model's layers hold this very object
            self.tp.rank, self.tp.size, self.tp.group = self.dist.tp_rank, self.dist.tp_size, self.dist.tp_group
        self.divergence = DivergenceDetector(self.config.divergence_check_interval, self.dist.tp_size,
                                             self.dist.tp_cpu_group, self.dist.tp_group_ranks, self.dist.rank)

    def load_model(self) -> None:
        c = self.config
        torch.manual_seed(c.seed)
        dtype = resolve_dtype(c.dtype, self.hf_config, self.device)
        self.runner = ModelRunner(
            c.model, self.hf_config, self.tp, dtype, self.device, c.block_size, self.max_model_len,
            max(c.max_num_batched_tokens, self.max_model_len), c.max_num_seqs, enforce_eager=c.enforce_eager,
        )

    def determine_num_available_blocks(self) -> int:
        """This rank's own capacity; the executor takes the MIN over ranks."""
        c = self.config
        if c.num_gpu_blocks_override is not None:
            return c.num_gpu_blocks_override
        budget = self.runner.kv_cache_budget(c.kv_cache_memory, c.gpu_memory_utilization)
        blocks = budget // self.runner.kv_block_bytes()
        return int(max(0, min(blocks, self.runner.max_useful_blocks())))

    def initialize_cache(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise RuntimeError(
                "no memory is left for the KV cache on this rank; lower the model size per GPU (raise "
                "--tp), raise gpu_memory_utilization or set kv_cache_memory"
            )
        self.runner.allocate_kv_cache(num_blocks)

    def execute_model(self, step: StepInput) -> SampledStep:
        """Launch one step; its output reaches the host through result() (in step order: the divergence
        check hashes the tokens as they arrive)."""
        sampled = self.runner.execute(step)
        sampled.then(self._observe)
        return sampled

    def _observe(self, out: SamplerOutput) -> None:
        out.token_ids = self.divergence.observe(out.token_ids)

    def check_health(self) -> None:
        if self.runner is None or self.dist is None:
            raise RuntimeError("worker is not initialised (no model or no process group)")
        if not dist.is_initialized():
            raise RuntimeError("the worker's process group has been destroyed")
        probe = torch.ones(1)
        work = dist.all_reduce(probe, group=self.dist.world_cpu_group, async_op=True)
        if not work.wait(timeout=datetime.timedelta(seconds=min(30.0, self.config.dist_timeout_s))):
            raise RuntimeError("health probe all_reduce did not complete")
        if int(probe.item()) != self.dist.world_size:
            raise RuntimeError(f"health probe summed to {probe.item()}, expected {self.dist.world_size}")

    def reinitialize_distributed(self, request: ReconfigureDistributedRequest) -> None:
        if request.new_world_size != self.config.parallel.world_size:
            raise ValueError(
                f"cannot reconfigure to world size {request.new_world_size}: the loaded shards need "
                f"tp({self.config.parallel.tensor_parallel_size}) * dp({self.config.parallel.data_parallel_size})"
            )
        old_tp_rank = self.dist.tp_rank
        if request.new_rank % self.dist.tp_size != old_tp_rank:
            raise ValueError(
                f"rank {request.new_rank} would hold TP shard {request.new_rank % self.dist.tp_size}, but "
                f"this worker loaded shard {old_tp_rank}; keep rank % tp unchanged"
            )
        shutdown_distributed()
        self.dargs = replace(
            self.dargs, master_addr=request.new_master_addr, master_port=request.new_master_port,
            world_size=request.new_world_size, rank=request.new_rank, store_hosted_by_launcher=False,
            local_rank=self.dargs.local_rank if request.new_local_rank is None else request.new_local_rank,
        )
        self.init_device()

    def shutdown(self) -> None:
        shutdown_distributed()
