"""The one run object: every run, one process or many, applies its parallel plan here and gets the
executor, the data-parallel group and the gradient completion and clipping the loop uses.

The plan is applied in order pipeline split -> tensor parallel -> FSDP2, each skipped when its size is 1
(world size 1 is just the smallest mesh: nothing is wrapped). What runs is a `ModelWithHead`: the
model, or this rank's pipeline stage of it, ending in the algorithm's head (log-probs, scores), so a
loss never needs to know the layout. Frozen models (a DPO reference copy, later reward models) are
wrapped the same way. `forward_only_items` is the one forward-only pass over a data layout (reference
log-probs), split over data-parallel ranks and gathered back.
"""

import logging

import numpy as np
import torch
import torch.distributed as dist

from nemo_aligner.models.heads import ModelWithHead
from nemo_aligner.parallel.data_parallel import DataParallel, strided_share
from nemo_aligner.parallel.executor import PlainExecutor
from nemo_aligner.parallel.fsdp import apply_fsdp, clip_grad_norm_
from nemo_aligner.parallel.pipeline import PipelineExecutor, prune_to_stage
from nemo_aligner.parallel.tensor_parallel import apply_tensor_parallel, reduce_partial_grads, vocab_parallel_context

log = logging.getLogger("nemo_aligner")


def stage_pruner(parallel):
    """For `build_model(prune=...)`: with pipeline parallel, a checkpoint is read for this stage's modules only."""
    if parallel.dims.pp == 1:
        return None

    def prune(model):
        parallel.dims.check_model(model.config)
        return _prune(parallel, model)

    return prune


def _prune(parallel, model):
    layers = parallel.dims.stage_layers(model.config.num_layers)[parallel.pp_rank]
    return prune_to_stage(model, layers, parallel.is_first_stage, parallel.is_last_stage)


def parallelize(parallel, model, head, frozen: bool = False) -> ModelWithHead:
    """This rank's part of `model` (modified in place) ending in `head`: its pipeline stage (pruning is
    idempotent, so an already pruned model is fine), tensor-parallel shards of it, FSDP2 over "dp"."""
    dims = parallel.dims
    if dims.pp > 1:
        _prune(parallel, model)
    module = ModelWithHead(model, head if parallel.is_last_stage else None)
    if frozen:
        module.requires_grad_(False).eval()
    if dims.tp > 1:
        apply_tensor_parallel(module, parallel.mesh["tp"], dims.sequence_parallel)
    if dims.dp > 1:
        apply_fsdp(module, parallel.mesh["dp"], reshard_after_forward=dims.pp == 1)
    return module


class ParallelRun:
    """The parallel pieces of one run. `model` is this rank's GPTModel (built whole, or already pruned to
    its pipeline stage); `head` what its forward ends in; `max_row_tokens` the longest row of any
    micro-batch (pipeline stages exchange one fixed shape)."""

    def __init__(self, parallel, model, head, *, autocast=None, max_row_tokens: int = 0):
        self.parallel = parallel
        dims = parallel.dims
        self.policy = parallelize(parallel, model, head)
        self.model = model  # this rank's GPTModel: optimiser, checkpoints and export use its names
        self.dp = DataParallel(rank=parallel.dp_rank, size=dims.dp, group=parallel.group("dp"))
        context = lambda: vocab_parallel_context(dims.tp > 1)  # noqa: E731
        if dims.pp > 1:
            self.executor = PipelineExecutor(self.policy, parallel, seq_len=max_row_tokens,
                                             schedule=dims.pipeline_schedule, autocast=autocast,
                                             compute_context=context)
        else:
            # FSDP reduce-scatters after every micro-batch, so gradients stay sharded (memory / dp); deferring
            # it to the last micro-batch would save communication but hold full-size gradients meanwhile.
            self.executor = PlainExecutor(self.policy, device=parallel.device, autocast=autocast,
                                          compute_context=context,
                                          seq_multiple=dims.tp if dims.sequence_parallel else 1)
        if parallel.distributed:
            log.info("parallel layout: %s; this rank: pp %d, dp %d, tp %d (layers %s)%s", dims.describe(),
                     parallel.pp_rank, parallel.dp_rank, parallel.tp_rank, list(model.layers.keys()),
                     ", sequence parallel" if dims.sequence_parallel else "")

    def wrap_frozen(self, model, head) -> ModelWithHead:
        """A frozen model (e.g. a reference copy made before the policy was wrapped) laid out like the policy."""
        return parallelize(self.parallel, model, head, frozen=True)

    @staticmethod
    def all_ranks_have(path) -> bool:
        """True when the file exists on every rank (so all take the same branch around a collective)."""
        flag = torch.tensor([1 if path.is_file() else 0], dtype=torch.int64)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def finish_grads(self, params, max_norm: float) -> float:
        """A step's gradients completed (partial sums reduced) and clipped to max_norm; returns the global norm."""
        dims = self.parallel.dims
        if dims.tp > 1 and dims.dp == 1:
            reduce_partial_grads(params)
        return clip_grad_norm_(params, max_norm, self.parallel.group("pp") if dims.pp > 1 else None)

    def topology(self) -> dict:
        d = self.parallel.dims
        return {"pp": d.pp, "dp": d.dp, "tp": d.tp,
                "layer_split": [len(r) for r in d.stage_layers(self.model.config.num_layers)]}

    @torch.no_grad()
    def forward_only_items(self, module, layout, micro_batch_size: int, make_batch, reduce_fn) -> np.ndarray:
        """[num_examples, K] float64: reduce_fn(batch, outputs) -> [examples of the batch, K] for every example
        of `layout`. Each dp rank runs a strided share of the items (padded to the busiest rank's count of
        forwards, which FSDP's collectives need), the pipeline's last stage sends its results to the other
        stages, and the rows are summed over dp (each example is run by exactly one rank)."""
        dataset, dp = layout.dataset, self.dp
        batches = [make_batch(dataset, items, layout.packed)
                   for items in strided_share(layout.items, micro_batch_size, dp)]
        num_real, num_forwards = len(batches), dp.all_reduce_max(len(batches))
        batches += (batches[:1] or [make_batch(dataset, layout.items[:1], layout.packed)]) * (num_forwards - num_real)
        was_training = module.training
        module.eval()
        try:
            results = self.executor.forward_only(module, batches, reduce_fn)
        finally:
            module.train(was_training)
        out = None
        for batch, values in zip(batches[:num_real], results):
            values = values.double().cpu()
            if out is None:
                out = torch.zeros(len(dataset), *values.shape[1:], dtype=torch.float64)
            out[batch.example_indices.cpu()] = values
        width = results[0].shape[1:] if results else ()
        out = out if out is not None else torch.zeros(len(dataset), *width, dtype=torch.float64)
        return dp.all_reduce_sum(out).numpy().copy()


__all__ = ["ParallelRun", "parallelize", "stage_pruner"]
