"""One SFT micro-batch: the normalised NLL of the response tokens and metric sums, from the model's
per-token log-probs (and argmax-correctness, for token accuracy).

The loop owns accumulation and the optimiser; this file owns what a micro-batch contributes. The
loss is normalised by `num_units` summed over the *global* batch (response tokens, or sequences with
model.sft.loss_normalization=sequences), so micro-batch size, accumulation, packing and data
parallel never reweight anything. Metrics are returned as sums and divided once by the loop.
"""

from dataclasses import dataclass

import torch

from nemo_aligner.data.batch import IGNORE_INDEX
from nemo_aligner.data.sft.collate import SFTBatch, collate_sft
from nemo_aligner.losses.logprobs import LogProbHead
from nemo_aligner.losses.sft import loss_numerator, num_units, per_sequence_nll


@dataclass
class SFTSettings:
    loss_normalization: str = "tokens"
    chunk_size: int = 1024

    @classmethod
    def from_config(cls, cfg) -> "SFTSettings":
        return cls(loss_normalization=cfg.loss_normalization, chunk_size=cfg.logprob_chunk_size)


class SFTAlgorithm:
    """The algorithm protocol (training.protocol) for supervised fine-tuning."""

    headline_metrics = ("loss", "token_acc")

    def __init__(self, settings: SFTSettings, pad_id: int):
        self.settings = settings
        self.pad_id = pad_id

    @property
    def unit(self) -> str:
        return self.settings.loss_normalization

    def head(self) -> LogProbHead:
        return LogProbHead(self.settings.chunk_size, with_correct=True)

    def num_units(self, batch: SFTBatch) -> int:
        scored = batch.labels != IGNORE_INDEX
        return num_units(batch.seq_index[scored], batch.num_sequences, self.settings.loss_normalization)

    def make_batch(self, dataset, items, packed: bool) -> SFTBatch:
        return collate_sft(dataset, items, self.pad_id, packed)

    def loss(self, batch: SFTBatch, outputs_RT2, num_units_global: int):
        """(loss, metric sums) from the head's [R, T, 2] (log-prob, argmax == label) per position."""
        scored_RT = batch.labels != IGNORE_INDEX
        logps_N, correct_N = outputs_RT2[scored_RT].unbind(-1)
        nll_S, counts_S = per_sequence_nll(logps_N, batch.seq_index[scored_RT], batch.num_sequences)
        numerator = loss_numerator(self.settings.loss_normalization, nll_S, counts_S)
        loss = numerator / max(num_units_global, 1)
        sums = {"loss": numerator.detach(), "nll_sum": nll_S.detach().sum(), "correct": correct_N.detach().sum().double(),
                "response_tokens": counts_S.sum().double(), "sequences": torch.tensor(float(batch.num_sequences))}
        return loss, sums

    @staticmethod
    def reduce_metrics(sums: dict, num_units_global: int) -> dict[str, float]:
        """loss as optimised (per unit); token_acc and token_nll always per response token."""
        tokens = max(float(sums["response_tokens"]), 1.0)
        return {"loss": float(sums["loss"]) / max(num_units_global, 1), "token_acc": float(sums["correct"]) / tokens,
                "token_nll": float(sums["nll_sum"]) / tokens, "response_tokens": float(sums["response_tokens"]),
                "sequences": float(sums["sequences"])}
