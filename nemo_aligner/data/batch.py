"""The model-input layout every task shares: sequences laid out in rows, padded (one sequence per
row) or packed (several whole sequences per row, block-diagonal attention through segment ids).

Every layout describes what to score the same way, so log-probs and losses never care which was used:
  labels_RT      next-token target at each position, -100 where nothing is scored
  seq_index_RT   which sequence of the micro-batch each target belongs to, -1 where nothing is scored
  segment_ids_RT packed rows only: which sequence each token belongs to (attention stays inside it)
A task's batch (`PreferenceBatch`, `SFTBatch`) adds its own fields to `Batch`.

Shapes: R rows, T tokens per row, S sequences in the micro-batch.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
# Fill values for the [R, T] fields of a batch; any other [R, T] tensor is padded with 0.
_PAD_VALUES = {"labels": IGNORE_INDEX, "seq_index": -1}


@dataclass(kw_only=True)
class Batch:
    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T]
    seq_index: torch.Tensor  # [R, T]
    segment_ids: torch.Tensor | None  # [R, T] packed rows only; None = plain causal attention
    example_indices: torch.Tensor  # [number of examples] dataset indices of the micro-batch's examples
    num_real_tokens: int = 0  # non-padding tokens in the micro-batch

    @property
    def num_examples(self) -> int:
        return len(self.example_indices)

    def to(self, device) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return dataclasses.replace(self, **moved)

    def padded(self, num_rows: int, seq_len: int) -> "Batch":
        """A copy with every [R, T] tensor padded to [num_rows, seq_len]. Padding scores nothing (labels
        -100) and, being after every real token, cannot change a causal model's outputs; packed rows give
        every padding token its own segment so its position is 0."""
        R, T = self.input_ids.shape
        if (R, T) == (num_rows, seq_len):
            return self
        if R > num_rows or T > seq_len:
            raise ValueError(f"micro-batch of {R} rows x {T} tokens does not fit the fixed shape "
                             f"{num_rows} x {seq_len}")
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, torch.Tensor) or value.dim() < 2 or tuple(value.shape[:2]) != (R, T):
                continue
            if f.name == "segment_ids":  # one segment per padding token: positions stay 0 (learned positions)
                first = int(value.max()) + 1 if value.numel() else 0
                out = first + torch.arange(num_rows * seq_len, dtype=value.dtype,
                                           device=value.device).view(num_rows, seq_len)
            else:
                out = value.new_full((num_rows, seq_len, *value.shape[2:]), _PAD_VALUES.get(f.name, 0))
            out[:R, :T] = value
            changes[f.name] = out
        return dataclasses.replace(self, **changes)


def layout_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], pad_id: int, packed: bool) -> dict:
    """rows: per row, the (token ids [L], label mask [L]) of each sequence laid end to end in it.

    Token i of a sequence is a target (predicted from position i - 1) where its mask is set; sequences
    are numbered in order of appearance (seq_index). Returns the [R, T] tensors of `Batch` and
    num_real_tokens."""
    T = max(sum(len(ids) for ids, _ in row) for row in rows)
    R = len(rows)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
    seq_index = np.full((R, T), -1, dtype=np.int64)
    segment_ids = np.full((R, T), -1, dtype=np.int64)
    s = num_real = 0
    for r, row in enumerate(rows):
        start = 0
        for segment, (ids, mask) in enumerate(row):
            end = start + len(ids)
            input_ids[r, start:end] = ids
            segment_ids[r, start:end] = segment
            scored = np.flatnonzero(mask[1:]) + start  # position t predicts token t + 1
            labels[r, scored] = ids[scored - start + 1]
            seq_index[r, scored] = s
            start, s = end, s + 1
        num_real += start
        # Trailing padding: one segment per token, so its positions stay 0 (a row padded to a longer pack in
        # the micro-batch would otherwise count positions past max_position_embeddings for learned positions).
        segment_ids[r, start:] = len(row) + np.arange(T - start)
    return dict(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                seq_index=torch.from_numpy(seq_index),
                segment_ids=torch.from_numpy(segment_ids) if packed else None, num_real_tokens=num_real)
