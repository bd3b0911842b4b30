"""Lay tokenised SFT examples out as model inputs (`data.batch.layout_rows`): padded rows (one
example per row) or packed rows (several whole examples per row). Sequence s of a micro-batch is its
s-th example. Shapes: S examples in the micro-batch.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.data.batch import Batch, layout_rows


@dataclass(kw_only=True)
class SFTBatch(Batch):
    @property
    def num_sequences(self) -> int:
        return self.num_examples


def collate_sft(dataset, items, pad_id: int, packed: bool) -> SFTBatch:
    """items: example indices (one per row, right-padded to the longest), or packs of example indices
    (each pack one row of whole examples)."""
    rows = [list(pack) for pack in items] if packed else [[index] for index in items]
    sequences = [[(dataset.examples[i].ids, dataset.examples[i].label_mask) for i in row] for row in rows]
    indices = [i for row in rows for i in row]
    return SFTBatch(**layout_rows(sequences, pad_id, packed), example_indices=torch.as_tensor(indices, dtype=torch.long))
