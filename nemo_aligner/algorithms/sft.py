"""One SFT micro-batch: response-token log-probs (chunked), the normalised NLL, and metric sums.

The loop owns accumulation and the optimiser; this file owns what a micro-batch contributes. The
loss is normalised by `num_units` summed over the *global* batch (response tokens, or sequences with
model.sft.loss_normalization=sequences), so micro-batch size, accumulation, packing and data
parallel never reweight anything. Metrics are returned as sums and divided once by the loop.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.data.collate import IGNORE_INDEX
from nemo_aligner.data.sft_collate import SFTBatch, collate_sft_packed, collate_sft_padded
from nemo_aligner.losses.logprobs import token_logprobs_and_correct
from nemo_aligner.losses.sft import loss_numerator, num_units, per_sequence_nll


@dataclass
class SFTSettings:
    loss_normalization: str = "tokens"
    chunk_size: int = 1024

    @classmethod
    def from_config(cls, cfg) -> "SFTSettings":
        return cls(loss_normalization=cfg.loss_normalization, chunk_size=cfg.logprob_chunk_size)


class SFTAlgorithm:
    """What the loop calls: make micro-batches, count loss units, compute a micro-batch's loss, reduce metrics."""

    def __init__(self, model, settings: SFTSettings, pad_id: int, autocast=None):
        self.model = model
        self.settings = settings
        self.pad_id = pad_id
        self.autocast = autocast or torch.autocast("cpu", enabled=False)

    @property
    def unit(self) -> str:
        return self.settings.loss_normalization

    def num_units(self, batch: SFTBatch) -> int:
        scored = batch.labels != IGNORE_INDEX
        return num_units(batch.seq_index[scored], batch.num_sequences, self.settings.loss_normalization)

    def make_batch(self, dataset, items, packed: bool) -> SFTBatch:
        if packed:
            return collate_sft_packed(dataset, items, self.pad_id)
        return collate_sft_padded(dataset, items, self.pad_id)

    def loss(self, batch: SFTBatch, num_units_global: int):
        scored_RT = batch.labels != IGNORE_INDEX
        with self.autocast:
            hidden_RTE = self.model(batch.input_ids, segment_ids=batch.segment_ids)
            logps_N, correct_N = token_logprobs_and_correct(hidden_RTE[scored_RT], self.model.output_weight,
                                                            batch.labels[scored_RT], self.settings.chunk_size,
                                                            self.model.config.final_logit_softcapping)
        nll_S, counts_S = per_sequence_nll(logps_N, batch.seq_index[scored_RT], batch.num_sequences)
        numerator = loss_numerator(self.settings.loss_normalization, nll_S, counts_S)
        loss = numerator / max(num_units_global, 1)
        sums = {"loss": numerator.detach(), "nll_sum": nll_S.detach().sum(), "correct": correct_N.sum().double(),
                "response_tokens": counts_S.sum().double(), "sequences": torch.tensor(float(batch.num_sequences))}
        return loss, sums

    @staticmethod
    def reduce_metrics(sums: dict, num_units_global: int) -> dict[str, float]:
        """loss as optimised (per unit); token_acc and token_nll always per response token."""
        tokens = max(float(sums["response_tokens"]), 1.0)
        return {"loss": float(sums["loss"]) / max(num_units_global, 1), "token_acc": float(sums["correct"]) / tokens,
                "token_nll": float(sums["nll_sum"]) / tokens, "response_tokens": float(sums["response_tokens"]),
                "sequences": float(sums["sequences"])}
