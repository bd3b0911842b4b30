"""Pipeline parallel with `torch.distributed.pipelining`: the layers split into stages, 1F1B or GPipe.

Stages are pruned copies of the model (torchtitan's way): stage s keeps its global layer indices
(ModuleDict keys, so checkpoint names do not change), the first stage keeps the embeddings, the last
the final norm and the log-prob head. A step's micro-batches (global / (micro x dp) of them; a
micro-batch holds whole pairs) go through one schedule step.

Activations cross stages as [R, T, E] tensors of one fixed shape per run (static stage metadata, no
shape inference per step): every micro-batch is padded to R rows and T tokens (T = the longest row
in the data). Every pipeline rank of a data-parallel replica builds the same micro-batches, so the
per-micro-batch position ids, packed-sequence ids (segment_ids), shared-prompt branch ids (branch_ids)
and labels reach each stage as stage kwargs alongside the activations it receives, with nothing extra
on the wire.

The last stage emits the head's output (e.g. dense per-token log-probs); the loss and metrics are
computed there (the algorithm's `loss(batch, outputs, num_units)`, as in the plain executor) and the
metric sums are broadcast to the other stages, so every rank's loop logs the same numbers.
"""

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from nemo_aligner.models.gpt import positions_from_segments
from nemo_aligner.parallel.executor import accumulate, zeros_like_sums

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}


def prune_to_stage(model, layers: range, is_first: bool, is_last: bool):
    """Keep only this stage's modules of a GPTModel (in place): its layers, and embeddings / final norm
    and output projection on the first / last stage."""
    for key in list(model.layers.keys()):
        if int(key) not in layers:
            del model.layers[key]
    if not is_first:
        model.embedding = None
        model.position_embedding = None
    if not is_last:
        model.final_norm = None
        model.output_layer = None
    return model


class PipelineExecutor:
    """Runs a global batch's micro-batches through this rank's pipeline stage (see the module docstring)."""

    def __init__(self, module, parallel, *, seq_len: int, schedule: str = "1f1b", autocast=None,
                 compute_context=None):
        self.algorithm = None  # set by the loop
        self.module = module  # this rank's stage: a ModelWithHead around the pruned GPTModel (maybe FSDP)
        self.parallel = parallel
        self.seq_len = seq_len
        self.schedule_name = schedule
        self.autocast = autocast or contextlib.nullcontext()
        self.compute_context = compute_context or contextlib.nullcontext
        self.device = parallel.device
        self.pp_group = parallel.group("pp")
        self.last_stage_rank = parallel.pp_peer(parallel.dims.pp - 1)
        self._schedules = {}
        self._run_state = None

    # ------------------------------------------------------------------ public
    def forward_backward(self, batches, num_units: int) -> dict:
        self._prepare(batches)
        return self._run(self.module, batches, "train", num_units=num_units)

    def evaluate(self, batches, num_units: int, num_real: int | None = None) -> dict:
        self._prepare(batches)
        num_real = len(batches) if num_real is None else num_real
        return self._run(self.module, batches, "eval", num_units=num_units, num_real=num_real)

    def forward_only(self, module, batches, reduce_fn) -> list:
        """reduce_fn(batch, outputs) per batch, computed on the last stage and sent to all."""
        return self._run(module, batches, "collect", reduce_fn=reduce_fn)

    # ------------------------------------------------------------------ internals
    def _prepare(self, batches):
        prepare = getattr(self.algorithm, "prepare", None)
        if prepare is not None:
            prepare(batches, self)

    def _schedule(self, module, num_micro: int, rows: int, train: bool):
        key = (id(module), num_micro, rows, train)
        if key not in self._schedules:
            p = self.parallel
            T, E = self.seq_len, module.config.hidden_size
            meta = dict(device="meta")
            # activations that carry gradients between stages must say so: receive buffers are made from this
            inputs = (torch.empty(rows, T, dtype=torch.long, **meta) if p.is_first_stage
                      else torch.empty(rows, T, E, dtype=module.activation_dtype, **meta).requires_grad_(train))
            outputs = torch.empty(rows, T, *module.output_trailing_shape(), dtype=module.output_dtype(), **meta)
            outputs.requires_grad_(train)
            stage = PipelineStage(module, p.pp_rank, p.dims.pp, self.device, input_args=(inputs,),
                                  output_args=(outputs,), group=self.pp_group)
            # Forward-only passes use GPipe (1F1B needs >= num_stages micro-batches and gains nothing there).
            cls = SCHEDULES[self.schedule_name] if train else ScheduleGPipe
            self._schedules[key] = cls(stage, num_micro, loss_fn=self._loss_fn, scale_grads=False)
        return self._schedules[key]

    def _run(self, module, batches, mode, num_units=0, num_real=None, reduce_fn=None):
        rows = max(b.input_ids.shape[0] for b in batches)
        longest = max(b.input_ids.shape[1] for b in batches)
        if longest > self.seq_len:
            raise ValueError(f"a micro-batch has {longest} tokens per row, more than the pipeline's fixed "
                             f"{self.seq_len} (set from the data at start-up)")
        padded = [b.padded(rows, self.seq_len).to(self.device) for b in batches]
        self._run_state = dict(batches=padded, mode=mode, num_units=num_units, sums={}, collected={},
                               num_real=len(batches) if num_real is None else num_real, reduce_fn=reduce_fn)
        kwargs = {"labels": torch.cat([b.labels for b in padded]),
                  "position_ids": torch.cat([_positions(b) for b in padded])}
        for name in ("segment_ids", "branch_ids"):  # packed rows, shared-prompt pairs (one layout per run)
            if getattr(padded[0], name) is not None:
                kwargs[name] = torch.cat([getattr(b, name) for b in padded])
        args = (torch.cat([b.input_ids for b in padded]),) if self.parallel.is_first_stage else ()
        target = torch.arange(len(padded), device=self.device)
        schedule = self._schedule(module, len(padded), rows, train=mode == "train")
        with self.compute_context(), self.autocast:
            if mode == "train":
                schedule.step(*args, target=target, return_outputs=False, **kwargs)
            else:
                with torch.no_grad():
                    schedule.eval(*args, target=target, **kwargs)
        if mode != "train":
            _reshard(module)
        state, self._run_state = self._run_state, None
        if mode == "collect":
            result = [state["collected"].get(i) for i in range(len(padded))]
        else:
            result = {k: float(v) for k, v in state["sums"].items()}
        result = self._from_last_stage(result)
        if mode == "collect":
            return [r.to(self.device) for r in result]
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in result.items()}

    def _loss_fn(self, output, target):
        """Called by the schedule on the last stage, once per micro-batch, in micro-batch order."""
        state = self._run_state
        index = int(target.reshape(-1)[0])
        batch = state["batches"][index]
        with torch.autocast(self.device.type, enabled=False):
            if state["mode"] == "collect":
                state["collected"][index] = state["reduce_fn"](batch, output.detach()).cpu()
                return output.sum() * 0.0
            loss, metric_sums = self.algorithm.loss(batch, output, state["num_units"])
        if index >= state["num_real"]:  # padding micro-batch: same metric names, zero values
            metric_sums = zeros_like_sums(metric_sums)
        accumulate(state["sums"], metric_sums)
        return loss

    def _from_last_stage(self, obj):
        if self.parallel.dims.pp == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(holder, src=self.last_stage_rank, group=self.pp_group)
        return holder[0]


def _positions(batch) -> torch.Tensor:
    if batch.position_ids is not None:  # prefix groups: explicit positions
        return batch.position_ids
    if batch.segment_ids is not None:
        return positions_from_segments(batch.segment_ids)
    R, T = batch.input_ids.shape
    return torch.arange(T, device=batch.input_ids.device).expand(R, T).contiguous()


def _reshard(module) -> None:
    """Free the parameters a forward-only pass left gathered (FSDP units that do not reshard after forward)."""
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()
