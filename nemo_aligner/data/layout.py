"""How a dataset's examples are grouped into *items*, the unit the global batch counts.

An **item** is one example (a pair for DPO, a conversation for SFT) in the padded layout, or one
pack (a list of example indices whose tokens share one row) in the packed layout.
`model.global_batch_size` and `model.micro_batch_size` count items; the loss is still normalised by
the examples (or tokens) of the global batch, so the layout never reweights anything.
This is the only meaning of "item" in the code base.
"""

import logging
from dataclasses import dataclass

from nemo_aligner.data.dataset import TokenizedDataset
from nemo_aligner.data.packing import pack, packing_stats

log = logging.getLogger("nemo_aligner")


@dataclass
class DataLayout:
    dataset: TokenizedDataset
    items: list  # example indices (padded) or packs, lists of example indices (packed)
    packed: bool = False

    def max_row_tokens(self) -> int:
        """Longest row any micro-batch can have (pipeline stages exchange one fixed shape)."""
        if self.packed:
            lengths = self.dataset.pack_lengths()
            return int(max(lengths[pack].sum() for pack in self.items))
        return max(self.dataset.padded_row_length(i) for i in self.items)

    def examples_per_item(self) -> float:
        return len(self.dataset) / len(self.items)


def padded_layout(dataset: TokenizedDataset | None) -> DataLayout | None:
    return None if dataset is None else DataLayout(dataset, list(range(len(dataset))))


def pack_examples(dataset: TokenizedDataset, pack_size: int, algorithm: str, seed: int,
                  name: str = "data") -> list[list[int]]:
    """Group the dataset's examples into packs of at most pack_size tokens (an example is never split)."""
    try:
        return pack(dataset.pack_lengths(), pack_size, algorithm, seed)
    except ValueError as err:
        raise ValueError(f"{name}: cannot pack {dataset.unit} into pack_size={pack_size}: {err} "
                         f"({dataset.pack_hint})") from None


def pack_summary(dataset: TokenizedDataset, packs: list, pack_size: int) -> dict:
    """Packs, examples, examples per pack, efficiency (real tokens / (packs x pack_size)), lower bound."""
    lengths = dataset.pack_lengths()
    stats = packing_stats(lengths, packs, pack_size)
    return {"num_packs": stats["num_packs"], "num_examples": stats["num_entries"],
            "avg_examples_per_pack": stats["avg_entries_per_pack"], "efficiency": stats["efficiency"],
            "num_tokens": int(lengths.sum()), "min_packs": stats["min_packs"]}


def packed_layout(dataset: TokenizedDataset, packs: list, pack_size: int, how: str, name: str) -> DataLayout:
    stats = pack_summary(dataset, packs, pack_size)
    unit = dataset.unit
    log.info("%s: %d %s in %d packs of <= %d tokens (%s): %.2f %s per pack, %.1f%% of pack tokens are real; "
             "micro_batch_size and global_batch_size count packs", name, stats["num_examples"], unit,
             stats["num_packs"], pack_size, how, stats["avg_examples_per_pack"], unit, 100 * stats["efficiency"])
    return DataLayout(dataset, packs, packed=True)


def layout(dataset: TokenizedDataset | None, *, packing: bool, pack_size: int, algorithm: str, seed: int,
           name: str) -> DataLayout | None:
    """The items of `dataset`: one per example, or (packing) packs built now with `algorithm`."""
    if dataset is None:
        return None
    if not packing:
        return padded_layout(dataset)
    packs = pack_examples(dataset, pack_size, algorithm, seed, name=f"{name} data")
    return packed_layout(dataset, packs, pack_size, f"{algorithm}, seed {seed}", name)
