"""The model-input layout every task shares: sequences laid out in rows, padded (one sequence per
row) or packed (several whole sequences per row, block-diagonal attention through segment ids), and
prefix groups (a shared prefix read by several branches, e.g. a DPO prompt and its two responses).

Every layout describes what to score the same way, so log-probs and losses never care which was used:
  labels_RT      next-token target at each position, -100 where nothing is scored
  seq_index_RT   which sequence of the micro-batch each target belongs to, -1 where nothing is scored
  segment_ids_RT packed rows and prefix groups: which sequence (or group) each token belongs to
                 (attention stays inside it); None = one causal sequence per row
  branch_ids_RT  prefix groups only (the mask descriptor beside segment_ids): 0 = a shared token, read by
                 every branch of its segment; k >= 1 = branch k, which reads the shared tokens and itself,
                 never another branch; None = no branches
  position_ids_RT prefix groups only: each token's position in the sequence it stands for (every branch
                 continues after the shared prefix); None = 0.. per row, or restarting per segment
A task's batch (`PreferenceBatch`, `SFTBatch`) adds its own fields to `Batch`.

Shapes: R rows, T tokens per row, S sequences in the micro-batch.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
# Fill values for the [R, T] fields of a batch; any other [R, T] tensor is padded with 0 (a padding token
# is then branch 0 of a segment of its own, at position 0).
_PAD_VALUES = {"labels": IGNORE_INDEX, "seq_index": -1}


@dataclass
class PrefixGroup:
    """Sequences that share their first tokens, laid out once: `shared` (no targets of its own), then each
    branch (token ids [L], label mask [L]) at positions len(shared).. as if it followed `shared` alone."""

    shared: np.ndarray
    branches: list


@dataclass(kw_only=True)
class Batch:
    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T]
    seq_index: torch.Tensor  # [R, T]
    segment_ids: torch.Tensor | None  # [R, T] packed rows / prefix groups; None = plain causal attention
    example_indices: torch.Tensor  # [number of examples] dataset indices of the micro-batch's examples
    num_real_tokens: int = 0  # non-padding tokens in the micro-batch (a shared prefix counts once)
    branch_ids: torch.Tensor | None = None  # [R, T] prefix groups only (see the module docstring)
    position_ids: torch.Tensor | None = None  # [R, T] prefix groups only

    @property
    def num_examples(self) -> int:
        return len(self.example_indices)

    def model_inputs(self) -> dict:
        """The keyword inputs of a `models.heads.ModelWithHead` forward besides the token ids."""
        return dict(labels=self.labels, position_ids=self.position_ids, segment_ids=self.segment_ids,
                    branch_ids=self.branch_ids)

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


def _group_length(entry) -> int:
    if isinstance(entry, PrefixGroup):
        return len(entry.shared) + sum(len(ids) for ids, _ in entry.branches)
    return len(entry[0])


class _Rows:
    """The [R, T] arrays `layout_rows` fills, and the running sequence number."""

    def __init__(self, R: int, T: int, pad_id: int):
        self.input_ids = np.full((R, T), pad_id, dtype=np.int64)
        self.labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
        self.seq_index = np.full((R, T), -1, dtype=np.int64)
        self.segment_ids = np.full((R, T), -1, dtype=np.int64)
        self.branch_ids = np.zeros((R, T), dtype=np.int64)
        self.position_ids = np.zeros((R, T), dtype=np.int64)
        self.num_sequences = 0

    def put(self, r: int, start: int, ids, segment: int, branch: int, first_position: int, mask=None) -> int:
        """Tokens `ids` at row r from `start`; with `mask`, a sequence whose token i is a target (predicted
        from position i - 1) where the mask is set. Returns the end."""
        end = start + len(ids)
        self.input_ids[r, start:end] = ids
        self.segment_ids[r, start:end] = segment
        self.branch_ids[r, start:end] = branch
        self.position_ids[r, start:end] = first_position + np.arange(len(ids))
        if mask is not None:
            scored = np.flatnonzero(mask[1:]) + start  # position t predicts token t + 1
            self.labels[r, scored] = ids[scored - start + 1]
            self.seq_index[r, scored] = self.num_sequences
            self.num_sequences += 1
        return end


def layout_rows(rows: list[list], pad_id: int, packed: bool) -> dict:
    """rows: per row, the entries laid end to end in it: a sequence (token ids [L], label mask [L]) or a
    `PrefixGroup`. Sequences (a group's branches in order) are numbered in order of appearance (seq_index).
    Returns the [R, T] tensors of `Batch` and num_real_tokens; a layout with prefix groups also gets
    segment ids (one per entry), branch ids and position ids."""
    T = max(sum(_group_length(entry) for entry in row) for row in rows)
    out = _Rows(len(rows), T, pad_id)
    grouped = any(isinstance(entry, PrefixGroup) for row in rows for entry in row)
    num_real = 0
    for r, row in enumerate(rows):
        start = 0
        for segment, entry in enumerate(row):
            if isinstance(entry, PrefixGroup):
                start = out.put(r, start, entry.shared, segment, 0, 0)
                for branch, (ids, mask) in enumerate(entry.branches, start=1):
                    start = out.put(r, start, ids, segment, branch, len(entry.shared), mask)
            else:
                start = out.put(r, start, entry[0], segment, 0, 0, entry[1])
        num_real += start
        # Trailing padding: one segment per token, so its positions stay 0 (a row padded to a longer pack in
        # the micro-batch would otherwise count positions past max_position_embeddings for learned positions).
        out.segment_ids[r, start:] = len(row) + np.arange(T - start)
    tensors = dict(input_ids=out.input_ids, labels=out.labels, seq_index=out.seq_index)
    if packed or grouped:
        tensors["segment_ids"] = out.segment_ids
    if grouped:
        tensors |= dict(branch_ids=out.branch_ids, position_ids=out.position_ids)
    return ({"segment_ids": None} | {name: torch.from_numpy(value) for name, value in tensors.items()}
            | dict(num_real_tokens=num_real))
