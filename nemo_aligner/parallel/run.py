"""Assemble a distributed training run from a built model: the one place that applies, in order,
pipeline split -> tensor parallel -> FSDP2, and hands the loop what it needs (executor, gradient
clipping, data-parallel group), the reference (frozen sharded copy or precomputed log-probs) and the
Hugging Face export. Recipes call it only when launched with more than one process.
"""

import copy
import logging

import torch
import torch.distributed as dist

from nemo_aligner.models.logprob_model import TokenLogProbModel
from nemo_aligner.parallel.export import export_hf_parallel
from nemo_aligner.parallel.fsdp import apply_fsdp, clip_grad_norm_
from nemo_aligner.parallel.pipeline import PipelineExecutor, max_row_tokens, prune_to_stage
from nemo_aligner.parallel.tensor_parallel import apply_tensor_parallel, vocab_parallel_context
from nemo_aligner.training.executor import PlainExecutor
from nemo_aligner.training.loop import DataParallel

log = logging.getLogger("nemo_aligner")


def stage_pruner(parallel):
    """For `build_model(prune=...)`: with pipeline parallel, a checkpoint is read for this stage's modules only."""
    if not parallel.distributed or parallel.dims.pp == 1:
        return None

    def prune(model):
        parallel.dims.check_model(model.config)
        layers = parallel.dims.stage_layers(model.config.num_layers)[parallel.pp_rank]
        return prune_to_stage(model, layers, parallel.is_first_stage, parallel.is_last_stage)

    return prune


def parallelize(parallel, model, chunk_size: int, frozen: bool = False) -> TokenLogProbModel:
    """This rank's part of `model` (modified in place): its pipeline stage (pruning is idempotent, so an
    already pruned model is fine), tensor-parallel shards of it, FSDP2 over "dp", inside a
    TokenLogProbModel whose forward ends in per-token log-probs."""
    dims, mesh = parallel.dims, parallel.mesh
    layers = dims.stage_layers(model.config.num_layers)[parallel.pp_rank]
    prune_to_stage(model, layers, parallel.is_first_stage, parallel.is_last_stage)
    module = TokenLogProbModel(model, chunk_size, is_last=parallel.is_last_stage)
    if frozen:
        module.requires_grad_(False).eval()
    if dims.tp > 1:
        apply_tensor_parallel(module, mesh["tp"], dims.sequence_parallel)
    # Always FSDP (also with dp = 1): every parameter becomes a DTensor, so the optimiser, clipping,
    # checkpoints and export see one kind of tensor whatever the layout.
    apply_fsdp(module, mesh["dp"], reshard_after_forward=dims.pp == 1)
    return module


class ParallelRun:
    """The distributed pieces of one run. `model` is the full model every rank built identically."""

    def __init__(self, parallel, model, *, chunk_size: int, autocast, online_reference: bool, datasets):
        self.parallel = parallel
        dims = parallel.dims
        ref_source = copy.deepcopy(model) if online_reference else None
        self.policy = parallelize(parallel, model, chunk_size)
        self.gpt = model  # this rank's pruned, sharded GPTModel: optimiser, checkpoints and export use its names
        self.reference_module = parallelize(parallel, ref_source, chunk_size, frozen=True) if ref_source else None
        self.dp = DataParallel(rank=parallel.dp_rank, size=dims.dp, group=parallel.group("dp"))
        context = lambda: vocab_parallel_context(dims.tp > 1)  # noqa: E731
        if dims.pp > 1:
            seq_len = max(max_row_tokens(d) for d in datasets if d is not None)
            self.executor = PipelineExecutor(None, self.policy, parallel, seq_len=seq_len,
                                             schedule=dims.pipeline_schedule, autocast=autocast,
                                             compute_context=context)
        else:
            # FSDP reduce-scatters after every micro-batch, so gradients stay sharded (memory / dp); deferring
            # it to the last micro-batch would save communication but hold full-size gradients meanwhile.
            self.executor = PlainExecutor(None, device=parallel.device, autocast=autocast, compute_context=context,
                                          seq_multiple=dims.tp if dims.sequence_parallel else 1)
        log.info("parallel layout: %s; this rank: pp %d, dp %d, tp %d (layers %s)%s", dims.describe(),
                 parallel.pp_rank, parallel.dp_rank, parallel.tp_rank, list(model.layers.keys()),
                 ", sequence parallel" if dims.sequence_parallel else "")

    def attach(self, algorithm) -> None:
        self.executor.algorithm = algorithm

    def trainer_kwargs(self) -> dict:
        pp_group = self.parallel.group("pp") if self.parallel.dims.pp > 1 else None
        return dict(executor=self.executor, dp=self.dp,
                    clip_grad=lambda params, max_norm: clip_grad_norm_(params, max_norm, pp_group))

    def topology(self) -> dict:
        d = self.parallel.dims
        return {"pp": d.pp, "dp": d.dp, "tp": d.tp, "layer_split": [len(r) for r in d.stage_layers(
            self.gpt.config.num_layers)]}

    @torch.no_grad()
    def precompute_reference(self, data, micro_batch_size: int, make_batch, reduce_fn) -> None:
        """dataset.ref_chosen / ref_rejected from the (not yet trained) parallel policy: each dp rank scores
        a strided slice of the items, the pipeline's last stage sends its results to the other stages, and
        the arrays are summed over dp (each pair is scored by exactly one rank)."""
        dataset, dp = data.dataset, self.dp
        mine = data.items[dp.rank::dp.size]
        batches = [make_batch(dataset, mine[i:i + micro_batch_size], data.packed)
                   for i in range(0, len(mine), micro_batch_size)]
        num_real, num_forwards = len(batches), dp.all_reduce_max(len(batches))
        batches += (batches[:1] or [make_batch(dataset, data.items[:1], data.packed)]) * (num_forwards - num_real)
        results = self.executor.forward_only(self.policy, batches, reduce_fn)
        chosen = torch.zeros(len(dataset), dtype=torch.float64)
        rejected = torch.zeros(len(dataset), dtype=torch.float64)
        for batch, ref in zip(batches[:num_real], results):
            idx = batch.pair_indices.cpu()
            chosen[idx], rejected[idx] = ref[0].double().cpu(), ref[1].double().cpu()
        both = dp.all_reduce_sum(torch.stack([chosen, rejected]))
        dataset.ref_chosen, dataset.ref_rejected = both[0].numpy().copy(), both[1].numpy().copy()

    def export_hf(self, path, tokenizer=None):
        return export_hf_parallel(self.parallel, self.gpt, path, tokenizer=tokenizer)


def all_ranks_have(path) -> bool:
    """True when the file exists on every rank (so all take the same branch around a collective)."""
    flag = torch.tensor([1 if path.is_file() else 0], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


__all__ = ["ParallelRun", "parallelize", "stage_pruner", "all_ranks_have"]
