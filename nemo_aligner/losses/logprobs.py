"""Per-sequence response log-probs from hidden states, a chunk of tokens at a time.

Only scored positions (label != -100) are projected to the vocabulary, and each chunk's logits
are recomputed in backward instead of stored, so a full [tokens, vocab] tensor never exists and
memory holds at most one chunk of logits. Log-softmax runs in fp32 whatever the model dtype.

Shapes: R rows, T tokens, E hidden, V vocabulary, N scored tokens, S sequences.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_logprobs(hidden_NE, weight_VE, targets_N):
    logits_NV = F.linear(hidden_NE, weight_VE).float()
    return -F.cross_entropy(logits_NV, targets_N, reduction="none")


def token_logprobs(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log p(target) for each of N positions, [N] fp32."""
    out = []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        if torch.is_grad_enabled():
            out.append(checkpoint(_chunk_logprobs, hidden_NE[sl], weight_VE, targets_N[sl], use_reentrant=False))
        else:
            out.append(_chunk_logprobs(hidden_NE[sl], weight_VE, targets_N[sl]))
    return torch.cat(out) if out else hidden_NE.new_zeros(0, dtype=torch.float32)


def sequence_logprobs(hidden_RTE, weight_VE, labels_RT, seq_index_RT, num_sequences: int, chunk_size: int = 1024):
    """(sum of response-token log-probs [S], number of response tokens [S]) per sequence."""
    scored_RT = labels_RT != IGNORE_INDEX
    hidden_NE = hidden_RTE[scored_RT]
    logps_N = token_logprobs(hidden_NE, weight_VE, labels_RT[scored_RT], chunk_size)
    seq_N = seq_index_RT[scored_RT]
    sums_S = logps_N.new_zeros(num_sequences).index_add(0, seq_N, logps_N)
    counts_S = torch.bincount(seq_N, minlength=num_sequences).to(logps_N.dtype)
    return sums_S, counts_S
