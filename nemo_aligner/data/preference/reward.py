"""Preference pairs as a reward model reads them: every row shape DPO accepts plus NeMo-Aligner's
comparison files and NeMo-RL rows (`data.preference.comparisons`), tokenised as DPO tokenises them (an
empty prompt allowed), and laid out with each sequence's score position marked (`data.scores`)
instead of response labels.

The dataset is an ordinary `PreferenceDataset`, so online packing, the row report and the over-length
policy (truncate | drop | error) are DPO's. A pair whose chosen and rejected tokens are identical
carries no preference and is an error naming its file:line.

Batch layout: sequence 2k of a micro-batch is the chosen and 2k + 1 the rejected sequence of its k-th
pair, in padded rows (one sequence each) or packed rows (whole pairs, so a pair never straddles
micro-batches or packs). Shapes: P pairs.
"""

from dataclasses import dataclass

import numpy as np
import torch

from nemo_aligner.data.batch import Batch
from nemo_aligner.data.dataset import TokenizeSettings, fingerprint_files
from nemo_aligner.data.preference.comparisons import read_reward_rows, reward_example
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.rows import PreferenceColumns
from nemo_aligner.data.preference.tokenize import tokenize_pair
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.scores import layout_scored


@dataclass(kw_only=True)
class RewardBatch(Batch):
    margins: torch.Tensor  # [P] subtracted from r_chosen - r_rejected (0 where a pair has none)

    @property
    def num_pairs(self) -> int:
        return self.num_examples


def tokenize_reward_pair(example, tokenizer, settings: TokenizeSettings):
    """DPO's tokenisation (the prompt may be empty); None when the over-length policy drops the pair."""
    pair = tokenize_pair(example, tokenizer, settings, require_prompt=False)
    if pair is not None and np.array_equal(pair.chosen, pair.rejected):
        how = (f" after truncation to seq_length={settings.seq_length} (raise it, or set model.data.overlength=drop)"
               if pair.truncated else "")
        raise DataError(f"{example.source}: chosen and rejected are identical{how}; a pair must differ for a reward "
                        "model to learn a preference from it")
    return pair


def reward_pairs_from_files(files, tokenizer, settings: TokenizeSettings,
                            columns: PreferenceColumns = PreferenceColumns(), margin_key: str | None = "margin",
                            name: str = "data") -> PreferenceDataset:
    """Every pair of `files` read, normalised and tokenised up front (errors name file:line)."""
    pairs, report, source_rows = PreferenceDataset.read(
        files, lambda row, where: reward_example(row, where, columns, margin_key),
        lambda example: tokenize_reward_pair(example, tokenizer, settings), name, read_file=read_reward_rows)
    fingerprint = fingerprint_files(report.files, tokenizer.fingerprint(), settings.key(), columns.__dict__,
                                    margin_key, "reward_pairs")
    dataset = PreferenceDataset(pairs, report, fingerprint=fingerprint)
    dataset.source_rows = source_rows
    return dataset


def collate_reward_pairs(dataset: PreferenceDataset, items, pad_id: int, packed: bool) -> RewardBatch:
    """items: pair indices (one sequence per row: [chosen_0, rejected_0, chosen_1, ...], right-padded), or
    packs of pair indices (each pack one row of whole pairs)."""
    packs = [list(pack) for pack in items] if packed else [[index] for index in items]
    indices = [index for pack in packs for index in pack]
    sequences = {index: [ids for ids, _ in dataset.pairs[index].sequences()] for index in indices}
    if packed:
        rows = [[ids for index in pack for ids in sequences[index]] for pack in packs]
    else:
        rows = [[ids] for index in indices for ids in sequences[index]]
    margins = [dataset.pairs[index].margin or 0.0 for index in indices]
    return RewardBatch(**layout_scored(rows, pad_id, packed), example_indices=torch.as_tensor(indices, dtype=torch.long),
                       margins=torch.tensor(margins, dtype=torch.float32))
