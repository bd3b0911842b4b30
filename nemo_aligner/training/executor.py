"""How one global batch's micro-batches are run: the loop asks an executor, the executor runs the model.

    executor.forward_backward(batches, num_units) -> metric sums   (gradients accumulated in .grad)
    executor.evaluate(batches, num_units, num_real) -> metric sums (no gradients)
    executor.forward_only(module, batches, reduce_fn) -> [reduce_fn(batch, token log-probs) per batch]

`PlainExecutor` is the micro-batch loop (single process, data and tensor parallel);
`nemo_aligner.parallel.pipeline.PipelineExecutor` runs the same micro-batches through pipeline
stages. Metric sums are this data-parallel rank's; the loop all-reduces them over "dp".

What an algorithm provides: `loss(batch, num_units) -> (loss, metric sums)` (plain path) and, for
pipeline stages, `loss_from_token_logprobs(batch, token_logps_RT, num_units)`; optionally
`prepare_batches(batches, executor)` (e.g. DPO's online reference pass) before each step. Trailing
`len(batches) - num_real` micro-batches are padding that keeps every data-parallel rank running the
same number of forwards (FSDP's collectives need it); their metric sums count as zeros.
"""

import contextlib
import dataclasses

import torch


def accumulate(total: dict, part: dict) -> None:
    for name, value in part.items():
        total[name] = total[name] + value.detach() if name in total else value.detach()


class PlainExecutor:
    def __init__(self, algorithm, device="cpu", autocast=None, compute_context=None, seq_multiple: int = 1):
        """compute_context: a context factory wrapped around forward and backward (vocab-parallel loss);
        seq_multiple: pad T to a multiple of this (sequence parallel shards T over tp)."""
        self.algorithm = algorithm
        self.device = device
        self.autocast = autocast or contextlib.nullcontext()
        self.compute_context = compute_context or contextlib.nullcontext
        self.seq_multiple = seq_multiple

    def _ready(self, batch):
        T = batch.input_ids.shape[1]
        if T % self.seq_multiple:
            batch = pad_batch(batch, batch.input_ids.shape[0], T + self.seq_multiple - T % self.seq_multiple)
        return batch.to(self.device)

    def _prepare(self, batches):
        prepare = getattr(self.algorithm, "prepare_batches", None)
        if prepare is not None:
            prepare(batches, self)

    def forward_backward(self, batches, num_units: int) -> dict:
        batches = [self._ready(b) for b in batches]
        self._prepare(batches)
        sums = {}
        for batch in batches:
            with self.compute_context():
                loss, metric_sums = self.algorithm.loss(batch, num_units)
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
                _, metric_sums = self.algorithm.loss(batch, num_units)
            # padding micro-batches count as zeros (every rank then reports the same metric names)
            accumulate(sums, metric_sums if i < num_real else {k: v * 0 for k, v in metric_sums.items()})
        return sums

    @torch.no_grad()
    def forward_only(self, module, batches, reduce_fn) -> list:
        """reduce_fn(batch, token_logps_RT) for each batch, where token_logps_RT is `module`'s output (a
        TokenLogProbModel: log-prob of each label, 0 where nothing is scored)."""
        out = []
        for batch in batches:
            batch = self._ready(batch)
            with self.compute_context(), self.autocast:
                token_logps_RT = module(batch.input_ids, labels=batch.labels, segment_ids=batch.segment_ids)
            out.append(reduce_fn(batch, token_logps_RT))
        return out


# Fill values for the [R, T] fields of a batch; any other [R, T] tensor is padded with 0.
_PAD_VALUES = {"labels": -100, "seq_index": -1}


def pad_batch(batch, num_rows: int, seq_len: int):
    """A copy of `batch` with every [R, T] tensor padded to [num_rows, seq_len]. Padding scores nothing
    (labels -100) and, being after every real token, cannot change a causal model's outputs; packed rows
    give every padding token its own segment so its position is 0."""
    R, T = batch.input_ids.shape
    if (R, T) == (num_rows, seq_len):
        return batch
    if R > num_rows or T > seq_len:
        raise ValueError(f"micro-batch of {R} rows x {T} tokens does not fit the fixed pipeline shape "
                         f"{num_rows} x {seq_len}")
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (R, T):
            continue
        if f.name == "segment_ids":  # one segment per padding token: positions stay 0 (learned positions)
            first = int(value.max()) + 1 if value.numel() else 0
            out = first + torch.arange(num_rows * seq_len, dtype=value.dtype, device=value.device).view(num_rows, seq_len)
        else:
            out = value.new_full((num_rows, seq_len, *value.shape[2:]), _PAD_VALUES.get(f.name, 0))
        out[:R, :T] = value
        changes[f.name] = out
    return dataclasses.replace(batch, **changes)
