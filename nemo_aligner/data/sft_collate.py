"""Lay tokenised SFT examples out as model inputs: padded rows (one example per row) or packed rows
(several whole examples per row, block-diagonal attention through segment_ids), and the online
packing that groups examples into packs.

Both layouts describe what to score the same way, so the loss never cares which was used:
  labels_RT     next-token target at each position, -100 where nothing is scored
  seq_index_RT  which example of the micro-batch each target belongs to, -1 where nothing is scored
Shapes: R rows, T tokens per row, S examples in the micro-batch.
"""

import logging
from dataclasses import dataclass, fields

import numpy as np
import torch

from nemo_aligner.data.collate import IGNORE_INDEX
from nemo_aligner.data.packing import pack, packing_stats

log = logging.getLogger(__name__)


@dataclass
class SFTBatch:
    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T]
    seq_index: torch.Tensor  # [R, T]
    segment_ids: torch.Tensor | None  # [R, T] packed rows only; None = plain causal attention
    example_indices: torch.Tensor  # [S] dataset indices of the examples
    num_real_tokens: int = 0  # non-padding tokens in the micro-batch

    @property
    def num_sequences(self) -> int:
        return len(self.example_indices)

    def to(self, device) -> "SFTBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return SFTBatch(**moved)


def _fill_rows(dataset, rows: list[list[int]], pad_id: int, packed: bool) -> SFTBatch:
    """rows: dataset indices laid end to end in each row -> one batch."""
    examples = [[dataset.examples[i] for i in row] for row in rows]
    T = max(sum(len(e) for e in row) for row in examples)
    R = len(rows)
    input_ids = np.full((R, T), pad_id, dtype=np.int64)
    labels = np.full((R, T), IGNORE_INDEX, dtype=np.int64)
    seq_index = np.full((R, T), -1, dtype=np.int64)
    segment_ids = np.full((R, T), -1, dtype=np.int64)
    s = 0
    for r, row in enumerate(examples):
        start = 0
        for segment, example in enumerate(row):
            end = start + len(example)
            input_ids[r, start:end] = example.ids
            segment_ids[r, start:end] = segment
            # position t predicts token t + 1: a target wherever the next token is labelled
            scored = np.flatnonzero(example.label_mask[1:]) + start
            labels[r, scored] = example.ids[scored - start + 1]
            seq_index[r, scored] = s
            start, s = end, s + 1
        # Trailing padding: one segment per token so its positions stay 0 (learned positions would otherwise
        # run past max_position_embeddings when a shorter pack is padded to a longer one in the micro-batch).
        segment_ids[r, start:] = len(row) + np.arange(segment_ids.shape[1] - start)
    flat = [i for row in rows for i in row]
    return SFTBatch(
        input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels), seq_index=torch.from_numpy(seq_index),
        segment_ids=torch.from_numpy(segment_ids) if packed else None,
        example_indices=torch.as_tensor(flat, dtype=torch.long),
        num_real_tokens=int(sum(len(e) for row in examples for e in row)),
    )


def collate_sft_padded(dataset, indices, pad_id: int) -> SFTBatch:
    """One example per row, right-padded to the longest in the micro-batch."""
    return _fill_rows(dataset, [[i] for i in indices], pad_id, packed=False)


def collate_sft_packed(dataset, packs, pad_id: int) -> SFTBatch:
    """packs: lists of dataset indices; each pack becomes one row of whole examples."""
    return _fill_rows(dataset, [list(p) for p in packs], pad_id, packed=True)


def pack_dataset(dataset, pack_size: int, algorithm: str = "best_fit_decreasing", seed: int = 0,
                 name: str = "data") -> list[list[int]]:
    """Online packing: bins of example indices, each holding at most pack_size tokens."""
    lengths = dataset.lengths()
    if lengths.max() > pack_size:
        raise ValueError(f"model.data.pack_size={pack_size} is smaller than the longest {name} example "
                         f"({int(lengths.max())} tokens); use pack_size >= model.data.seq_length")
    packs = pack(lengths, pack_size, algorithm, seed=seed)
    stats = packing_stats(lengths, packs, pack_size)
    log.info("%s: packed %d examples into %d packs of %d tokens (%s): %.2f examples per pack, %.1f%% full",
             name, len(lengths), stats["num_bins"], pack_size, algorithm, stats["avg_items_per_bin"],
             100 * stats["efficiency"])
    return packs
