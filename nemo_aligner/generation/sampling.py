"""Choosing the next token from logits: greedy, temperature, top-k, top-p; the log-prob of the choice.

Pure tensor functions. Sampling is inverse-CDF with one uniform number per row, drawn by the caller
from that row's own generator, so a completion does not depend on which rows share its batch (nor
on tensor-parallel layout: every rank computes the same). Order of the truncations as in transformers
and vLLM: temperature, then top-k, then top-p over the renormalised top-k distribution.

Shapes: B rows, V vocabulary, K candidates kept after sorting.
"""

import torch


def scaled_logprobs(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-softmax of logits / temperature in fp32 (temperature 0 = greedy: the untempered distribution)."""
    logits_BV = logits_BV.float()
    return torch.log_softmax(logits_BV / temperature if temperature > 0 else logits_BV, dim=-1)


def candidates(logps_BV: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [B, K] renormalised over the kept tokens, their token ids [B, K]), most likely first.

    top_k > 0 keeps the k most likely; top_p < 1 then keeps the smallest prefix whose mass reaches top_p
    (a token is kept while the mass before it is below top_p, so the most likely token always stays)."""
    V = logps_BV.shape[-1]
    k = min(top_k, V) if top_k > 0 else V
    values_BK, ids_BK = logps_BV.topk(k, dim=-1, sorted=True)
    probs_BK = torch.softmax(values_BK, dim=-1)
    if top_p < 1.0:
        mass_before_BK = probs_BK.cumsum(dim=-1) - probs_BK
        probs_BK = probs_BK.masked_fill(mass_before_BK >= top_p, 0.0)
        probs_BK = probs_BK / probs_BK.sum(dim=-1, keepdim=True)
    return probs_BK, ids_BK


def inverse_cdf(probs_BK: torch.Tensor, uniforms_B: torch.Tensor) -> torch.Tensor:
    """Index [B] of the first entry whose cumulative probability exceeds u (a zero-probability entry is never
    chosen); float64 sums so 100k-token vocabularies do not round."""
    cdf_BK = probs_BK.double().cumsum(dim=-1)
    targets_B1 = (uniforms_B.double().to(cdf_BK.device) * cdf_BK[:, -1])[:, None]
    index_B = torch.searchsorted(cdf_BK, targets_B1, right=True)[:, 0]
    return index_B.clamp(max=probs_BK.shape[-1] - 1)


def choose_tokens(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float,
                  uniforms_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B], their log-probs [B] at the sampling temperature before truncation)."""
    logps_BV = scaled_logprobs(logits_BV, temperature)
    if temperature == 0:
        tokens_B = logits_BV.argmax(dim=-1)  # the raw logits: exactly transformers' greedy choice
    elif top_k == 0 and top_p >= 1.0:  # nothing to truncate: no sort over the vocabulary
        tokens_B = inverse_cdf(logps_BV.exp(), uniforms_B)
    else:
        probs_BK, ids_BK = candidates(logps_BV, top_k, top_p)
        tokens_B = ids_BK.gather(1, inverse_cdf(probs_BK, uniforms_B)[:, None])[:, 0]
    return tokens_B, logps_BV.gather(1, tokens_B[:, None])[:, 0]
