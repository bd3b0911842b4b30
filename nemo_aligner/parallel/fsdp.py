"""Data parallel with FSDP2 (`fully_shard`): parameters, gradients and optimiser state sharded over "dp".

Each transformer layer is its own FSDP unit (all-gathered just before it runs, freed after), and the
root unit holds the rest (embeddings, final norm, output projection). With tensor parallel the
parameters are already DTensors on "tp" and FSDP adds the "dp" dimension (a 2-D mesh). The frozen
reference copy of `ref_mode=online` is sharded the same way and never holds gradients.

Gradients are summed, not averaged, over dp: every loss is already normalised by the number of units
(pairs, tokens) in the *global* batch, so averaging would divide by dp twice.

`clip_grad_norm_` computes the global norm over any mix of DTensor placements and pipeline stages.
"""

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor


def apply_fsdp(module, dp_mesh, reshard_after_forward: bool = True):
    """fully_shard every transformer layer of `module` (a ModelWithHead or GPTModel), then the root.

    reshard_after_forward=False (pipeline stages: several micro-batches per step) keeps gathered layers
    until the step's backward ends instead of gathering them again for every micro-batch. Explicit for
    the root too: left to FSDP, the root can stay gathered after a step, and its gathered parameters
    are then not the ones the optimiser (and the checkpoint's optimiser state) refers to."""
    model = getattr(module, "model", module)
    for layer in model.layers.values():
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_gradient_divide_factor(1.0)
            sub.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
    return module


def _sum_of_squares(grads: list, pp_group=None) -> torch.Tensor:
    """Σ g² over every gradient, each element counted once across the mesh (and across pipeline stages)."""
    by_group = defaultdict(list)  # (mesh, mesh dims the tensor is sharded over) -> local sums of squares
    plain = []
    for grad in grads:
        if isinstance(grad, DTensor):
            sharded = tuple(i for i, p in enumerate(grad.placements) if p.is_shard() or _is_strided(p))
            if any(p.is_partial() for p in grad.placements):
                raise RuntimeError(f"unreduced (Partial) gradient with placements {grad.placements}")
            by_group[(grad.device_mesh, sharded)].append(grad.to_local().double().square().sum())
        else:
            plain.append(grad.double().square().sum())
    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for (mesh, sharded), parts in by_group.items():
        value = torch.stack(parts).sum()
        for dim in sharded:
            dist.all_reduce(value, group=mesh.get_group(dim))
        total = total + value
    if plain:
        total = total + torch.stack(plain).sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(total, group=pp_group)
    return total


def _is_strided(placement) -> bool:
    return type(placement).__name__ == "_StridedShard"


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float, pp_group=None) -> float:
    """Global L2 norm of all gradients (every rank gets the same value); scales them to max_norm if above.
    Same arithmetic as torch.nn.utils.clip_grad_norm_ (coefficient max_norm / (norm + 1e-6), capped at 1)."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    if pp_group is None and not any(isinstance(g, DTensor) for g in grads):  # one process: torch's own, exactly
        return float(torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else float("inf")))
    norm = math.sqrt(float(_sum_of_squares(grads, pp_group)))
    if max_norm > 0 and math.isfinite(max_norm):
        coef = min(max_norm / (norm + 1e-6), 1.0)
        if coef < 1.0:
            for grad in grads:
                grad.mul_(coef)
    return norm
