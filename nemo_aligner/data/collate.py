"""Lay tokenised pairs out as model inputs: padded rows (one sequence per row, chosen/rejected
interleaved) or packed rows (several whole pairs per row, block-diagonal attention).

Both layouts produce the same description of what to score, so log-probs and losses never care
which was used:
  labels_RT     next-token target at each position, -100 where nothing is scored
  seq_index_RT  which sequence of the micro-batch each target belongs to (2k chosen, 2k+1 rejected
                of the k-th pair), -1 where nothing is scored
Shapes: R rows, T tokens per row, P pairs.
"""

from dataclasses import dataclass, fields

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class PreferenceBatch:
    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T]
    seq_index: torch.Tensor  # [R, T]
    segment_ids: torch.Tensor | None  # [R, T] packed rows only; None = plain causal attention
    chosen_rewards: torch.Tensor  # [P]
    rejected_rewards: torch.Tensor  # [P]
    pair_indices: torch.Tensor  # [P] dataset indices of the pairs
    ref_chosen: torch.Tensor | None = None  # [P] precomputed reference log-probs (summed)
    ref_rejected: torch.Tensor | None = None
    num_real_tokens: int = 0  # non-padding tokens in the micro-batch

    @property
    def num_pairs(self) -> int:
        return len(self.pair_indices)

    def to(self, device) -> "PreferenceBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PreferenceBatch(**moved)


def _pair_sequences(pair):
    """(token ids, prompt length) of the chosen and the rejected sequence."""
    return [(np.concatenate([pair.prompt, pair.chosen]), len(pair.prompt)),
            (np.concatenate([pair.prompt, pair.rejected]), len(pair.prompt))]


def _fill_rows(rows, pad_id: int, packed: bool):
    """rows: list of lists of (ids, prompt_len, seq_idx) -> tensors of the layout described above."""
    T = max(sum(len(ids) for ids, _, _ in row) for row in rows)
    R = len(rows)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
    seq_index = np.full((R, T), -1, dtype=np.int64)
    segment_ids = np.full((R, T), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        start = 0
        for segment, (ids, prompt_len, seq_idx) in enumerate(row):
            end = start + len(ids)
            input_ids[r, start:end] = ids
            segment_ids[r, start:end] = segment
            # position t predicts token t+1: score the response tokens, i.e. targets ids[prompt_len:]
            labels[r, start + prompt_len - 1:end - 1] = ids[prompt_len:]
            seq_index[r, start + prompt_len - 1:end - 1] = seq_idx
            start = end
        # Trailing padding: one segment per token, so its positions stay 0 (a row padded to a longer pack in
        # the micro-batch would otherwise count positions past max_position_embeddings for learned positions).
        segment_ids[r, start:] = len(row) + np.arange(T - start)
    segs = torch.from_numpy(segment_ids) if packed else None
    return torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(seq_index), segs


def _batch(dataset, indices, rows, pad_id, packed) -> PreferenceBatch:
    input_ids, labels, seq_index, segment_ids = _fill_rows(rows, pad_id, packed)
    rewards = np.array([dataset.rewards(i) for i in indices], dtype=np.float32).reshape(-1, 2)
    ref_c = ref_r = None
    if dataset.ref_chosen is not None:
        ref_c = torch.from_numpy(dataset.ref_chosen[indices].astype(np.float32))
        ref_r = torch.from_numpy(dataset.ref_rejected[indices].astype(np.float32))
    return PreferenceBatch(
        input_ids=input_ids, labels=labels, seq_index=seq_index, segment_ids=segment_ids,
        chosen_rewards=torch.from_numpy(rewards[:, 0].copy()), rejected_rewards=torch.from_numpy(rewards[:, 1].copy()),
        pair_indices=torch.as_tensor(indices, dtype=torch.long), ref_chosen=ref_c, ref_rejected=ref_r,
        num_real_tokens=int(sum(len(ids) for row in rows for ids, _, _ in row)),
    )


def collate_padded(dataset, indices, pad_id: int) -> PreferenceBatch:
    """One sequence per row: [chosen_0, rejected_0, chosen_1, ...], right-padded to the longest."""
    indices = list(indices)
    rows = []
    for k, index in enumerate(indices):
        for which, (ids, prompt_len) in enumerate(_pair_sequences(dataset.pairs[index])):
            rows.append([(ids, prompt_len, 2 * k + which)])
    return _batch(dataset, indices, rows, pad_id, packed=False)


def collate_packed(dataset, packs, pad_id: int) -> PreferenceBatch:
    """packs: list of lists of dataset indices; each pack becomes one row of whole pairs."""
    indices, rows = [], []
    for pack in packs:
        row = []
        for index in pack:
            k = len(indices)
            indices.append(index)
            for which, (ids, prompt_len) in enumerate(_pair_sequences(dataset.pairs[index])):
                row.append((ids, prompt_len, 2 * k + which))
        rows.append(row)
    return _batch(dataset, indices, rows, pad_id, packed=True)
