"""PreferenceDataset: every pair of the given files read, normalised and tokenised up front.

Reference log-probs, when precomputed, are stored beside the pairs (`ref_chosen`, `ref_rejected`)
and reach every micro-batch through the collate. `shared_prompt` says how a pair is laid out
(`data.preference.collate`): its prompt once, read by both responses, or two whole sequences; the
lengths packing and the pipeline's fixed shape use follow it.

A pair whose chosen and rejected responses are the same tokens carries no preference (its DPO loss is
log 2 whatever the model does, its gradient 0): when most pairs are like that the data is wrong and
loading fails; a few are counted and named (file:line) in a warning.
"""

import logging

import numpy as np

from nemo_aligner.data.dataset import TokenizedDataset, TokenizeSettings, fingerprint_files
from nemo_aligner.data.report import NAMED_SOURCES
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.preference.rows import PreferenceColumns, preference_from_row
from nemo_aligner.data.preference.tokenize import tokenize_pair

log = logging.getLogger("nemo_aligner")


class PreferenceDataset(TokenizedDataset):
    unit = "pairs"
    pack_hint = ("a pair occupies prompt + chosen + prompt + rejected tokens (prompt + 1 + chosen + rejected "
                 "with model.data.shared_prompt); use a pack size >= 2 x seq_length")

    def __init__(self, pairs: list, report, default_rewards=(1.0, 0.0), fingerprint: str = "",
                 shared_prompt: bool = False):
        super().__init__(pairs, report, fingerprint)
        self.default_rewards = default_rewards
        self.shared_prompt = shared_prompt  # lay each pair out as one prefix group (the recipe decides)
        self.ref_chosen: np.ndarray | None = None  # precomputed reference log-probs [num_pairs]
        self.ref_rejected: np.ndarray | None = None

    @property
    def pairs(self) -> list:
        return self.examples

    def rewards(self, index: int) -> tuple[float, float]:
        pair = self.examples[index]
        chosen = pair.chosen_reward if pair.chosen_reward is not None else self.default_rewards[0]
        rejected = pair.rejected_reward if pair.rejected_reward is not None else self.default_rewards[1]
        return chosen, rejected

    def pack_lengths(self) -> np.ndarray:
        if not self.shared_prompt:
            return super().pack_lengths()
        return np.array([pair.num_shared_tokens for pair in self.examples], dtype=np.int64)

    def padded_row_length(self, index: int) -> int:
        pair = self.examples[index]
        if self.shared_prompt:  # one row per pair
            return pair.num_shared_tokens
        return len(pair.prompt) + max(len(pair.chosen), len(pair.rejected))

    @classmethod
    def from_files(cls, files, tokenizer, settings: TokenizeSettings, columns: PreferenceColumns = PreferenceColumns(),
                   default_rewards=(1.0, 0.0), name: str = "data", shared_prompt: bool = False) -> "PreferenceDataset":
        identical = []

        def tokenize(example):
            pair = tokenize_pair(example, tokenizer, settings)
            if pair is not None and np.array_equal(pair.chosen, pair.rejected):
                identical.append(example.source)
            return pair

        pairs, report, source_rows = cls.read(files, lambda row, where: preference_from_row(row, where, columns),
                                              tokenize, name)
        check_identical(identical, len(pairs), name)
        fingerprint = fingerprint_files(report.files, tokenizer.fingerprint(), settings.key(), columns.__dict__)
        dataset = cls(pairs, report, default_rewards, fingerprint, shared_prompt)
        dataset.source_rows = source_rows
        return dataset


def check_identical(sources: list[str], num_pairs: int, name: str) -> None:
    """Fail when most pairs have chosen == rejected, warn (counted, named) when some do."""
    if not sources:
        return
    shown = ", ".join(sources[:NAMED_SOURCES]) + (" ..." if len(sources) > NAMED_SOURCES else "")
    text = (f"{name}: {len(sources)} of {num_pairs} pairs have the same chosen and rejected response ({shown}); such a "
            "pair carries no preference (loss log 2, no gradient)")
    if 2 * len(sources) > num_pairs:
        raise DataError(f"{text}: check the chosen/rejected columns (model.data.chosen_key / rejected_key)")
    log.warning("warning: %s and only adds a constant to the loss", text)


def options_from_config(model_cfg) -> tuple[TokenizeSettings, PreferenceColumns, tuple[float, float]]:
    """What turns rows into pairs (model.data.*): tokenisation settings, column names, default rewards."""
    data = model_cfg.data
    settings = TokenizeSettings(seq_length=model_cfg.seq_length, overlength=data.overlength,
                                chat_template=data.chat_template, add_bos=data.add_bos, add_eos=data.add_eos)
    columns = PreferenceColumns(prompt=data.prompt_key, chosen=data.chosen_key, rejected=data.rejected_key,
                                input=data.input_key)
    return settings, columns, (data.default_chosen_reward, data.default_rejected_reward)
