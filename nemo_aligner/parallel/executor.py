"""How one global batch's micro-batches are run: the loop asks an executor, the executor runs the module.

    executor.forward_backward(batches, num_units) -> metric sums   (gradients accumulated in .grad)
    executor.evaluate(batches, num_units, num_real) -> metric sums (no gradients)
    executor.forward_only(module, batches, reduce_fn) -> [reduce_fn(batch, outputs) per batch]

`PlainExecutor` is the micro-batch loop (one process, data and tensor parallel);
`parallel.pipeline.PipelineExecutor` runs the same micro-batches through pipeline stages. Both run
`module` (a `models.heads.ModelWithHead`) and hand its outputs to the algorithm
(`algorithm.loss(batch, outputs, num_units)`, see `training.protocol`); an algorithm's optional
`prepare(batches, executor)` runs first (e.g. DPO's reference pass). Metric sums are this
data-parallel rank's; the loop all-reduces them over "dp". Trailing `len(batches) - num_real`
micro-batches are padding that keeps every data-parallel rank running the same number of forwards
(FSDP's collectives need it); their metric sums count as zeros.
"""

import contextlib

import torch


def accumulate(total: dict, part: dict) -> None:
    for name, value in part.items():
        total[name] = total[name] + value.detach() if name in total else value.detach()


def zeros_like_sums(sums: dict) -> dict:
    return {k: v * 0 for k, v in sums.items()}


def run_module(module, batch):
    return module(batch.input_ids, **batch.model_inputs())


class PlainExecutor:
    def __init__(self, module, device="cpu", autocast=None, compute_context=None, seq_multiple: int = 1):
        """module: the policy (model + head); compute_context: a context factory wrapped around forward and
        backward (vocab-parallel loss); seq_multiple: pad T to a multiple of this (sequence parallel)."""
        self.module = module
        self.algorithm = None  # set by the loop (the executor exists before the algorithm's reference)
        self.device = device
        self.autocast = autocast or contextlib.nullcontext()
        self.compute_context = compute_context or contextlib.nullcontext
        self.seq_multiple = seq_multiple

    def _ready(self, batch):
        R, T = batch.input_ids.shape
        if T % self.seq_multiple:
            batch = batch.padded(R, T + self.seq_multiple - T % self.seq_multiple)
        return batch.to(self.device)

    def _prepare(self, batches):
        prepare = getattr(self.algorithm, "prepare", None)
        if prepare is not None:
            prepare(batches, self)

    def forward_backward(self, batches, num_units: int) -> dict:
        batches = [self._ready(b) for b in batches]
        self._prepare(batches)
        sums = {}
        for batch in batches:
            with self.compute_context():
                with self.autocast:
                    outputs = run_module(self.module, batch)
                loss, metric_sums = self.algorithm.loss(batch, outputs, num_units)
                loss.backward()
            accumulate(sums, metric_sums)
        return sums

    @torch.no_grad()
    def evaluate(self, batches, num_units: int, num_real: int | None = None) -> dict:
        batches = [self._ready(b) for b in batches]
        self._prepare(batches)
        num_real = len(batches) if num_real is None else num_real
        sums = {}
        for i, batch in enumerate(batches):
            with self.compute_context():
                with self.autocast:
                    outputs = run_module(self.module, batch)
                _, metric_sums = self.algorithm.loss(batch, outputs, num_units)
            # padding micro-batches count as zeros (every rank then reports the same metric names)
            accumulate(sums, metric_sums if i < num_real else zeros_like_sums(metric_sums))
        return sums

    @torch.no_grad()
    def forward_only(self, module, batches, reduce_fn) -> list:
        """reduce_fn(batch, outputs) for each batch, where outputs is `module`'s (e.g. dense token log-probs)."""
        out = []
        for batch in batches:
            batch = self._ready(batch)
            with self.compute_context(), self.autocast:
                outputs = run_module(module, batch)
            out.append(reduce_fn(batch, outputs))
        return out
