"""Sequences scored once each (reward models): the shared `data.batch` layout, with each sequence's
score position marked instead of its next-token targets.

Representation (what `labels_RT` / `seq_index_RT` mean in a scored batch):
  labels_RT     -100 everywhere except each sequence's *score position*, which holds that position's
                token id (any value != -100 marks it; nothing is predicted)
  seq_index_RT  the sequence (0 .. S-1, in order of appearance) at its score position, -1 elsewhere
The score position is the sequence's last token that is not `pad_id`, transformers' rule for
`*ForSequenceClassification` (with pad == EOS a trailing EOS is not scored; a sequence of pads only is
scored at its last token). Padded rows (one sequence each) and packed rows (several, with segment ids)
mark the same positions, so a score never depends on the layout.

Shapes: R rows, T tokens, S sequences.
"""

from dataclasses import dataclass

import numpy as np
import torch

from nemo_aligner.data.batch import IGNORE_INDEX, Batch, layout_rows


def score_position(ids: np.ndarray, pad_id: int) -> int:
    """Index of the last token of `ids` that is not pad_id (the last token when all are pad)."""
    real = np.flatnonzero(np.asarray(ids) != pad_id)
    return int(real[-1]) if real.size else len(ids) - 1


def layout_scored(rows: list[list[np.ndarray]], pad_id: int, packed: bool) -> dict:
    """rows: per row, the token ids [L] of each sequence laid end to end in it. Returns the [R, T] tensors
    of `Batch` (labels / seq_index marking each sequence's score position) and num_real_tokens."""
    out = layout_rows([[(ids, np.zeros(len(ids), dtype=bool)) for ids in row] for row in rows], pad_id, packed)
    labels_RT, seq_index_RT, input_ids_RT = out["labels"], out["seq_index"], out["input_ids"]
    s = 0
    for r, row in enumerate(rows):
        start = 0
        for ids in row:
            position = start + score_position(ids, pad_id)
            labels_RT[r, position] = input_ids_RT[r, position]
            seq_index_RT[r, position] = s
            start, s = start + len(ids), s + 1
    return out


@dataclass(kw_only=True)
class ScoredBatch(Batch):
    """Sequences to score (the scoring API's batches: one sequence per row)."""

    @property
    def num_sequences(self) -> int:
        return self.num_examples


def collate_sequences(sequences: list, pad_id: int) -> ScoredBatch:
    """One padded row per token sequence (each non-empty)."""
    rows = [[np.asarray(ids, dtype=np.int64)] for ids in sequences]
    return ScoredBatch(**layout_scored(rows, pad_id, packed=False),
                       example_indices=torch.arange(len(sequences), dtype=torch.long))


def sequence_scores(batch: Batch, scores_RT: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[S] the score of each sequence, read at its score position from the head's dense [R, T] scores."""
    scored_RT = batch.labels != IGNORE_INDEX
    seq_N = batch.seq_index[scored_RT]
    assert seq_N.numel() == num_sequences, "every sequence has exactly one score position"
    return scores_RT.new_zeros(num_sequences).index_copy(0, seq_N, scores_RT[scored_RT])
