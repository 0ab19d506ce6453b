"""Token embedding and LM head split by vocabulary rows across the tensor-parallel group.

The vocabulary is padded up to a multiple of the TP size; each rank holds a contiguous block of
rows [vocab_start, vocab_start + rows_per_rank). Padding rows are zero and never reach the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tprun.worker.layers.sharding import CheckpointTensor, load_shard, new_param
from tprun.worker.parallel import TPGroup


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        # Rows of this rank's block that are real tokens (the last rank's block may be part padding).
        self.num_real_rows = max(0, min(vocab_size - self.vocab_start, self.rows_per_rank))
        self.weight = new_param(self.rows_per_rank, embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        # Each rank embeds the ids in its block and zeros the rest; the all_reduce fills in the others.
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.rows_per_rank)
        embeds = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        embeds.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(embeds)

    def weight_loader(self, param: nn.Parameter, loaded: CheckpointTensor, shard_id: None = None) -> None:
        real = param.data.narrow(0, 0, self.num_real_rows)
        load_shard(real, loaded, dim=0, start=self.vocab_start, full_len=self.vocab_size)
        param.data[self.num_real_rows :].zero_()


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden W^T, computed per vocabulary block and gathered, so every rank gets the full vocab."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden)
