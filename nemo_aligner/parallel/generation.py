"""What the built-in sampler (`nemo_aligner.generation.sampler`) needs from the parallel layout: the full
logits of a vocabulary-sharded output projection, the sampled tokens made identical on every rank of a
tensor-parallel group, FSDP-sharded weights gathered for the duration of a generation call, and the check
that the layout can generate at all.

Tensor parallel runs the policy's own sharded layers (the model laid out as in training); each step's
[B, V] logits are all-gathered (small next to the weights), every rank samples the same tokens from the
same per-row generators, and rank 0 of the group broadcasts them anyway so no rounding difference can ever
make ranks disagree on when to stop (a mismatch would hang the next collective).

Shapes: B rows, E hidden, V vocabulary.
"""

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate


def check_generation_layout(dims) -> None:
    """ValueError for the layouts the sampler cannot run (dims: a ParallelDims)."""
    if dims.pp > 1:
        raise ValueError(f"generation with model.pipeline_model_parallel_size={dims.pp} is not supported: every rank "
                         "must hold whole layers; generate with pipeline_model_parallel_size=1 (tensor parallel works)")
    if dims.sequence_parallel:
        raise ValueError("generation with model.sequence_parallel=true is not supported: one token per step cannot "
                         "be split over the sequence; set model.sequence_parallel=false")


def full_logits(hidden_BE: torch.Tensor, weight_VE: torch.Tensor) -> torch.Tensor:
    """hidden @ weight.T in fp32 [B, V]; a vocabulary-sharded DTensor weight is projected shard-locally and
    the logits all-gathered."""
    if isinstance(weight_VE, DTensor):
        hidden = DTensor.from_local(hidden_BE, weight_VE.device_mesh, [Replicate()], run_check=False)
        return F.linear(hidden, weight_VE).full_tensor().float()
    return F.linear(hidden_BE, weight_VE).float()


def broadcast_from_first(tensor: torch.Tensor, group) -> torch.Tensor:
    """`tensor` as rank 0 of `group` has it (in place; no-op without a group)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast(tensor, src=dist.get_global_rank(group, 0), group=group)
    return tensor


@contextlib.contextmanager
def unsharded(module):
    """FSDP2 units of `module` gathered for the block (the decode path calls layers' eager `forward`, which
    skips FSDP's per-call gather); nothing to do without FSDP. Collective over "dp"."""
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
