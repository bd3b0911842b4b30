"""Lay tokenised pairs out as model inputs (`data.batch.layout_rows`): padded rows or packed rows
(several whole pairs per row), each pair either as two sequences or with a shared prompt.

Two sequences (`dataset.shared_prompt` false): [prompt | chosen] and [prompt | rejected]; padded rows
hold one sequence each (chosen and rejected interleaved).
Shared prompt (true, the recipe's default): one prefix group per pair (`TokenizedPair.prefix_group`)

    [prompt[:-1] | p_last chosen | p_last rejected]    p_last = the last prompt token, written twice

where both responses read the shared part, neither reads the other, and the rejected branch's positions
restart at P - 1 (P prompt tokens), so every scored position sees exactly the tokens and positions it
sees in its own sequence: log-probs, losses and gradients equal the two-sequence layout's up to float
rounding, for P + 1 + |chosen| + |rejected| tokens instead of 2P + |chosen| + |rejected|. Padded rows
then hold one pair each (half the rows), packed rows whole pairs.

Either way sequence 2k of a micro-batch is the chosen and 2k + 1 the rejected response of its k-th
pair, so per-sequence sums split into pairs with [0::2] / [1::2]. Shapes: P pairs.
"""

from dataclasses import dataclass

import numpy as np
import torch

from nemo_aligner.data.batch import Batch, layout_rows


@dataclass(kw_only=True)
class PreferenceBatch(Batch):
    chosen_rewards: torch.Tensor  # [P]
    rejected_rewards: torch.Tensor  # [P]
    ref_chosen: torch.Tensor | None = None  # [P] reference log-probs (summed), precomputed or filled per step
    ref_rejected: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return self.num_examples


def _entries(pair, shared_prompt: bool) -> list:
    return [pair.prefix_group()] if shared_prompt else pair.sequences()


def collate_pairs(dataset, items, pad_id: int, packed: bool) -> PreferenceBatch:
    """items: pair indices (right-padded rows: one sequence per row, [chosen_0, rejected_0, chosen_1, ...],
    or one pair per row with a shared prompt), or packs of pair indices (each pack one row of whole pairs)."""
    shared = getattr(dataset, "shared_prompt", False)
    packs = [list(pack) for pack in items] if packed else [[index] for index in items]
    indices = [index for pack in packs for index in pack]
    if packed or shared:
        rows = [[entry for index in pack for entry in _entries(dataset.pairs[index], shared)] for pack in packs]
    else:
        rows = [[seq] for index in indices for seq in dataset.pairs[index].sequences()]
    rewards = np.array([dataset.rewards(i) for i in indices], dtype=np.float32).reshape(-1, 2)
    ref_c = ref_r = None
    if dataset.ref_chosen is not None:
        ref_c = torch.from_numpy(dataset.ref_chosen[indices].astype(np.float32))
        ref_r = torch.from_numpy(dataset.ref_rejected[indices].astype(np.float32))
    return PreferenceBatch(
        **layout_rows(rows, pad_id, packed), example_indices=torch.as_tensor(indices, dtype=torch.long),
        chosen_rewards=torch.from_numpy(rewards[:, 0].copy()), rejected_rewards=torch.from_numpy(rewards[:, 1].copy()),
        ref_chosen=ref_c, ref_rejected=ref_r,
    )
