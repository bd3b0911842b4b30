"""This process's place among data-parallel replicas, and which items of a batch are its own.

The loop all-reduces metric sums and unit counts over "dp"; each global batch of items is split into
equal contiguous shares (training) or strided ones (validation and reference passes, where the last
share may be shorter). Rank 0 of 1 when not distributed: every reduction is then the identity.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DataParallel:
    rank: int = 0
    size: int = 1
    group: object = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized():
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_max(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return int(tensor.item())


def split_for_rank(items: list, micro_batch_size: int, dp: DataParallel) -> list[list]:
    """This rank's micro-batches of a global batch: an equal contiguous share, cut into micro-batches."""
    per_rank = len(items) // dp.size
    mine = items[dp.rank * per_rank:(dp.rank + 1) * per_rank]
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


def strided_share(items: list, micro_batch_size: int, dp: DataParallel) -> list[list]:
    """This rank's micro-batches of `items` taken with stride dp (every item scored by exactly one rank)."""
    mine = list(items[dp.rank::dp.size])
    return [mine[i:i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
