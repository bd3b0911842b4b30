"""The SFT objective as pure tensor functions: response-token NLL, normalised per token or per sequence.

A micro-batch returns its *share* of the global-batch loss (a sum divided by the global unit count,
passed in), so gradient accumulation, packing and data parallel never reweight tokens or sequences:
  tokens     sum of every response token's NLL / response tokens in the global batch
  sequences  sum over sequences of (their mean token NLL) / sequences in the global batch

Shapes: N scored tokens, S sequences in the micro-batch.
"""

import torch


def per_sequence_nll(token_logps_N: torch.Tensor, seq_index_N: torch.Tensor, num_sequences: int):
    """(summed NLL [S], response-token count [S]) per sequence."""
    nll_S = token_logps_N.new_zeros(num_sequences).index_add(0, seq_index_N, -token_logps_N)
    counts_S = torch.bincount(seq_index_N, minlength=num_sequences).to(token_logps_N.dtype)
    return nll_S, counts_S


def _tokens(nll_S, counts_S):
    return nll_S.sum()


def _sequences(nll_S, counts_S):
    return (nll_S / counts_S.clamp(min=1)).sum()


def _count_tokens(counts_S):
    return int(counts_S.sum().item())


def _count_sequences(counts_S):
    return int((counts_S > 0).sum().item())


# name -> (micro-batch numerator, unit count) for model.sft.loss_normalization
NORMALIZATIONS = {"tokens": (_tokens, _count_tokens), "sequences": (_sequences, _count_sequences)}


def loss_numerator(normalization: str, nll_S: torch.Tensor, counts_S: torch.Tensor) -> torch.Tensor:
    """The micro-batch's sum that `normalization` divides by the global unit count."""
    numerator, _ = NORMALIZATIONS[normalization]
    return numerator(nll_S, counts_S)


def sft_loss(token_logps_N, seq_index_N, num_sequences: int, normalization: str, num_units_global: int):
    """This micro-batch's share of the global-batch SFT loss (a scalar)."""
    nll_S, counts_S = per_sequence_nll(token_logps_N, seq_index_N, num_sequences)
    return loss_numerator(normalization, nll_S, counts_S) / max(num_units_global, 1)


def num_units(seq_index_N: torch.Tensor, num_sequences: int, normalization: str) -> int:
    """What `normalization` divides by, counted in one micro-batch (summed over the global batch by the loop)."""
    _, count = NORMALIZATIONS[normalization]
    return count(torch.bincount(seq_index_N, minlength=num_sequences))
