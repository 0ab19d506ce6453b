"""Linear layers split over the tensor-parallel group (vLLM's names and sharding).

Column-parallel layers split the output features: each rank computes its slice of the outputs and needs
no communication. Row-parallel layers split the input features: each rank computes a partial sum and
one all_reduce adds them. A column-parallel layer followed by a row-parallel one (q/k/v -> o,
gate/up -> down) therefore costs one all_reduce per pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tprun.worker.layers.sharding import CheckpointTensor, NarrowedTensor, load_replicated, load_shard, new_param
from tprun.worker.parallel import TPGroup, divide


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's rows (output features) split across ranks; y stays split."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TPGroup, what: str = "output size"):
        super().__init__()
        self.tp = tp
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_rank = divide(output_size, tp.size, what)
        self.weight = new_param(self.output_size_per_rank, input_size)
        self.bias = new_param(self.output_size_per_rank) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        n = self.output_size_per_rank
        load_shard(param.data, loaded, dim=0, start=self.tp.rank * n, full_len=self.output_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers on the same input fused into one matmul (gate_proj + up_proj).

    Each rank's weight is [its slice of part 0; its slice of part 1; ...], so the local output splits
    back into the parts with torch.split(output_sizes_per_rank).
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, tp: TPGroup, what: str):
        self.output_sizes = output_sizes
        self.output_sizes_per_rank = [divide(size, tp.size, what) for size in output_sizes]
        self.shard_ids = tuple(range(len(output_sizes)))  # the parts the loader must fill
        super().__init__(input_size, sum(output_sizes), bias, tp, what)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: int | str) -> None:
        if shard_id == "fused":  # the checkpoint stores the parts fused too (Phi-3's gate_up_proj)
            for part, start in enumerate(_offsets(self.output_sizes)):
                self.weight_loader(param, NarrowedTensor(loaded, 0, start, self.output_sizes[part]), part)
            return
        n = self.output_sizes_per_rank[shard_id]
        dst = param.data.narrow(0, sum(self.output_sizes_per_rank[:shard_id]), n)
        load_shard(dst, loaded, dim=0, start=self.tp.rank * n, full_len=self.output_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj fused, split by attention head.

    With fewer KV heads than ranks, KV heads are replicated as vLLM does: each rank holds one KV head,
    number rank * num_kv_heads // tp, so the ranks sharing a KV head are the ones whose query heads use it.
    """

    shard_ids = ("q", "k", "v")  # the parts the loader must fill

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool, tp: TPGroup
    ):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_heads_per_rank = divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads >= tp.size:
            self.num_kv_heads_per_rank = divide(num_kv_heads, tp.size, "num_key_value_heads")
            self.first_kv_head = tp.rank * self.num_kv_heads_per_rank
        else:
            if tp.size % num_kv_heads:
                raise ValueError(
                    f"num_key_value_heads ({num_kv_heads}) is smaller than the tensor-parallel size "
                    f"({tp.size}) and does not divide it, so KV heads cannot be replicated evenly; "
                    f"choose a tensor-parallel size that divides {num_kv_heads} or is a multiple of it"
                )
            self.num_kv_heads_per_rank = 1
            self.first_kv_head = tp.rank * num_kv_heads // tp.size
        local = (self.num_heads_per_rank + 2 * self.num_kv_heads_per_rank) * head_dim
        super().__init__(hidden_size, local * tp.size, bias, tp)
        self.q_size = self.num_heads_per_rank * head_dim
        self.kv_size = self.num_kv_heads_per_rank * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: str) -> None:
        hd = self.head_dim
        if shard_id == "qkv":  # the checkpoint stores q, k and v fused too (Phi-3's qkv_proj)
            sizes = [self.num_heads * hd, self.num_kv_heads * hd, self.num_kv_heads * hd]
            for part, start, size in zip("qkv", _offsets(sizes), sizes, strict=True):
                self.weight_loader(param, NarrowedTensor(loaded, 0, start, size), part)
            return
        # shard -> (offset in this rank's fused rows, rows, first checkpoint row, checkpoint rows)
        placement = {
            "q": (0, self.q_size, self.tp.rank * self.q_size, self.num_heads * hd),
            "k": (self.q_size, self.kv_size, self.first_kv_head * hd, self.num_kv_heads * hd),
            "v": (self.q_size + self.kv_size, self.kv_size, self.first_kv_head * hd, self.num_kv_heads * hd),
        }
        offset, rows, start, full_len = placement[shard_id]
        load_shard(param.data.narrow(0, offset, rows), loaded, dim=0, start=start, full_len=full_len)


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W's columns (input features) split across ranks; x arrives split, y is summed."""

    def __init__(
        self, input_size: int, output_size: int, bias: bool, tp: TPGroup, what: str = "input size",
        reduce_results: bool = True,
    ):
        super().__init__()
        self.tp = tp
        self.reduce_results = reduce_results  # False: the caller sums partial results first (MoE shared expert)
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_rank = divide(input_size, tp.size, what)
        self.weight = new_param(output_size, self.input_size_per_rank)
        self.bias = new_param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Only rank 0 adds the bias, so the all_reduce adds it exactly once.
        y = F.linear(x, self.weight, self.bias if self.tp.rank == 0 else None)
        return self.tp.all_reduce(y) if self.reduce_results else y

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        if param.dim() == 1:  # the bias is not split
            load_shard(param.data, loaded, dim=0, start=0, full_len=self.output_size)
        else:
            n = self.input_size_per_rank
            load_shard(param.data, loaded, dim=1, start=self.tp.rank * n, full_len=self.input_size)


class ReplicatedLinear(nn.Module):
    """y = x W^T + b with the whole W on every rank (MoE routers, the shared-expert gate): tiny, and every
    rank must route identically."""

    def __init__(self, input_size: int, output_size: int, bias: bool):
        super().__init__()
        self.weight = new_param(output_size, input_size)
        self.bias = new_param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        load_replicated(param, loaded)


def _offsets(sizes: list[int]) -> list[int]:
    return [sum(sizes[:i]) for i in range(len(sizes))]
