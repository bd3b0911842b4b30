"""Per-sequence response log-probs from hidden states, a chunk of tokens at a time.

Only scored positions (label != -100) are projected to the vocabulary, and each chunk's logits
are recomputed in backward instead of stored, so a full [tokens, vocab] tensor never exists and
memory holds at most one chunk of logits. Log-softmax runs in fp32 whatever the model dtype.
`logit_softcap` (the model's final_logit_softcapping, Gemma 2; None = off) caps each chunk's fp32
logits as cap * tanh(logits / cap) before the log-softmax, as `GPTModel.logits` does.

Shapes: R rows, T tokens, E hidden, V vocabulary, N scored tokens, S sequences.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def _logits(hidden_NE, weight_VE, logit_softcap):
    logits_NV = F.linear(hidden_NE, weight_VE).float()
    return logits_NV if logit_softcap is None else torch.tanh(logits_NV / logit_softcap) * logit_softcap


def _chunk_logprobs(hidden_NE, weight_VE, targets_N, logit_softcap=None):
    if isinstance(weight_VE, DTensor):  # tensor parallel: vocabulary sharded over tp, never gathered
        from nemo_aligner.parallel.tensor_parallel import vocab_parallel_logprobs

        return vocab_parallel_logprobs(hidden_NE, weight_VE, targets_N, logit_softcap=logit_softcap)
    logits_NV = _logits(hidden_NE, weight_VE, logit_softcap)
    return -F.cross_entropy(logits_NV, targets_N, reduction="none")


def token_logprobs(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                   chunk_size: int = 1024, logit_softcap: float | None = None) -> torch.Tensor:
    """log p(target) for each of N positions, [N] fp32."""
    out = []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, hidden_NE[sl], weight_VE, targets_N[sl], logit_softcap,
                                  use_reentrant=False))
        else:
            out.append(_chunk_logprobs(hidden_NE[sl], weight_VE, targets_N[sl], logit_softcap))
    return torch.cat(out) if out else hidden_NE.new_zeros(0, dtype=torch.float32)


def _chunk_logprobs_correct(hidden_NE, weight_VE, targets_N, logit_softcap=None):
    if isinstance(weight_VE, DTensor):  # tensor parallel: vocabulary sharded over tp, never gathered
        from nemo_aligner.parallel.tensor_parallel import vocab_parallel_logprobs

        return vocab_parallel_logprobs(hidden_NE, weight_VE, targets_N, with_correct=True, logit_softcap=logit_softcap)
    logits_NV = _logits(hidden_NE, weight_VE, logit_softcap)
    correct_N = logits_NV.detach().argmax(dim=-1) == targets_N
    return -F.cross_entropy(logits_NV, targets_N, reduction="none"), correct_N


def token_logprobs_and_correct(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                               chunk_size: int = 1024,
                               logit_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N] fp32, argmax == target [N] bool): token accuracy from the same chunked pass."""
    logps, correct = [], []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        args = (hidden_NE[start:start + chunk_size], weight_VE, targets_N[start:start + chunk_size], logit_softcap)
        if torch.is_grad_enabled():
            lp, ok = checkpoint(_chunk_logprobs_correct, *args, use_reentrant=False)
        else:
            lp, ok = _chunk_logprobs_correct(*args)
        logps.append(lp)
        correct.append(ok)
    if not logps:
        return hidden_NE.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden_NE.device)
    return torch.cat(logps), torch.cat(correct)


def sequence_logprobs(hidden_RTE, weight_VE, labels_RT, seq_index_RT, num_sequences: int, chunk_size: int = 1024,
                      logit_softcap: float | None = None):
    """(sum of response-token log-probs [S], number of response tokens [S]) per sequence."""
    scored_RT = labels_RT != IGNORE_INDEX
    hidden_NE = hidden_RTE[scored_RT]
    logps_N = token_logprobs(hidden_NE, weight_VE, labels_RT[scored_RT], chunk_size, logit_softcap)
    seq_N = seq_index_RT[scored_RT]
    sums_S = logps_N.new_zeros(num_sequences).index_add(0, seq_N, logps_N)
    counts_S = torch.bincount(seq_N, minlength=num_sequences).to(logps_N.dtype)
    return sums_S, counts_S


def dense_token_logprobs(hidden_RTE, weight_VE, labels_RT, chunk_size: int = 1024, with_correct: bool = False,
                         logit_softcap: float | None = None):
    """log p(label) at every scored position of [R, T] (0 elsewhere), fp32; a fixed shape for pipeline stages.

    with_correct: [R, T, 2] with (log-prob, argmax == label as 0/1) in the last dim.
    """
    scored_RT = labels_RT != IGNORE_INDEX
    hidden_NE, targets_N = hidden_RTE[scored_RT], labels_RT[scored_RT]
    if with_correct:
        logps_N, correct_N = token_logprobs_and_correct(hidden_NE, weight_VE, targets_N, chunk_size, logit_softcap)
        values_N2 = torch.stack([logps_N, correct_N.to(logps_N.dtype)], dim=-1)
        out = values_N2.new_zeros(*labels_RT.shape, 2)
        return out.masked_scatter(scored_RT[..., None], values_N2)
    logps_N = token_logprobs(hidden_NE, weight_VE, targets_N, chunk_size, logit_softcap)
    return logps_N.new_zeros(labels_RT.shape).masked_scatter(scored_RT, logps_N)


def sequence_sums(token_logps_RT, labels_RT, seq_index_RT, num_sequences: int):
    """(sum of log-probs [S], number of scored tokens [S]) per sequence from dense per-token log-probs."""
    scored_RT = labels_RT != IGNORE_INDEX
    logps_N, seq_N = token_logps_RT[scored_RT], seq_index_RT[scored_RT]
    sums_S = logps_N.new_zeros(num_sequences).index_add(0, seq_N, logps_N)
    counts_S = torch.bincount(seq_N, minlength=num_sequences).to(logps_N.dtype)
    return sums_S, counts_S
