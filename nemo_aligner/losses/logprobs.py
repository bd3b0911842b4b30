"""Per-token response log-probs from hidden states, a chunk of tokens at a time.

Only scored positions (label != -100) are projected to the vocabulary, and each chunk's logits
are recomputed in backward instead of stored, so a full [tokens, vocab] tensor never exists and
memory holds at most one chunk of logits. Log-softmax runs in fp32 whatever the model dtype.
`logit_softcap` (the model's final_logit_softcapping, Gemma 2; None = off) caps each chunk's fp32
logits as cap * tanh(logits / cap) before the log-softmax, as `GPTModel.logits` does.

`LogProbHead` is how a model's forward ends in training (`models.heads.ModelWithHead`): dense
per-token log-probs [R, T] (0 where nothing is scored), a fixed shape that pipeline stages can send.
How one chunk is projected is a function the head holds (`LogProbFns`): the plain one here, or the
vocab-parallel one that `parallel.tensor_parallel` installs when the output weight is sharded.

Shapes: R rows, T tokens, E hidden, V vocabulary, N scored tokens, S sequences.
"""

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if cap is None else torch.tanh(logits / cap) * cap


def chunk_logprobs(hidden_NE, weight_VE, targets_N, logit_softcap=None) -> torch.Tensor:
    """log p(target) [N] fp32 for one chunk, projecting with the full output weight."""
    logits_NV = softcap(F.linear(hidden_NE, weight_VE).float(), logit_softcap)
    return -F.cross_entropy(logits_NV, targets_N, reduction="none")


def chunk_logprobs_and_correct(hidden_NE, weight_VE, targets_N, logit_softcap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N] fp32, argmax == target [N] bool) for one chunk."""
    logits_NV = softcap(F.linear(hidden_NE, weight_VE).float(), logit_softcap)
    correct_N = logits_NV.detach().argmax(dim=-1) == targets_N
    return -F.cross_entropy(logits_NV, targets_N, reduction="none"), correct_N


class LogProbFns(NamedTuple):
    """How one chunk is projected, each called as fn(hidden_NE, weight_VE, targets_N, logit_softcap): log-probs,
    and log-probs with argmax-correctness (token accuracy)."""

    logprobs: Callable
    logprobs_and_correct: Callable


PLAIN = LogProbFns(chunk_logprobs, chunk_logprobs_and_correct)


def token_logprobs(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                   chunk_size: int = 1024, fns: LogProbFns = PLAIN, logit_softcap: float | None = None) -> torch.Tensor:
    """log p(target) for each of N positions, [N] fp32."""
    out = []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        args = (hidden_NE[start:start + chunk_size], weight_VE, targets_N[start:start + chunk_size], logit_softcap)
        if torch.is_grad_enabled():
            out.append(checkpoint(fns.logprobs, *args, use_reentrant=False))
        else:
            out.append(fns.logprobs(*args))
    return torch.cat(out) if out else hidden_NE.new_zeros(0, dtype=torch.float32)


def token_logprobs_and_correct(hidden_NE: torch.Tensor, weight_VE: torch.Tensor, targets_N: torch.Tensor,
                               chunk_size: int = 1024, fns: LogProbFns = PLAIN,
                               logit_softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target) [N] fp32, argmax == target [N] bool): token accuracy from the same chunked pass."""
    logps, correct = [], []
    for start in range(0, hidden_NE.shape[0], chunk_size):
        args = (hidden_NE[start:start + chunk_size], weight_VE, targets_N[start:start + chunk_size], logit_softcap)
        if torch.is_grad_enabled():
            lp, ok = checkpoint(fns.logprobs_and_correct, *args, use_reentrant=False)
        else:
            lp, ok = fns.logprobs_and_correct(*args)
        logps.append(lp)
        correct.append(ok)
    if not logps:
        return hidden_NE.new_zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.bool, device=hidden_NE.device)
    return torch.cat(logps), torch.cat(correct)


def dense_token_logprobs(hidden_RTE, weight_VE, labels_RT, chunk_size: int = 1024, with_correct: bool = False,
                         fns: LogProbFns = PLAIN, logit_softcap: float | None = None):
    """log p(label) at every scored position of [R, T] (0 elsewhere), fp32.

    with_correct: [R, T, 2] with (log-prob, argmax == label as 0/1) in the last dim.
    """
    scored_RT = labels_RT != IGNORE_INDEX
    hidden_NE, targets_N = hidden_RTE[scored_RT], labels_RT[scored_RT]
    if with_correct:
        logps_N, correct_N = token_logprobs_and_correct(hidden_NE, weight_VE, targets_N, chunk_size, fns, logit_softcap)
        values_N2 = torch.stack([logps_N, correct_N.to(logps_N.dtype)], dim=-1)
        out = values_N2.new_zeros(*labels_RT.shape, 2)
        return out.masked_scatter(scored_RT[..., None], values_N2)
    logps_N = token_logprobs(hidden_NE, weight_VE, targets_N, chunk_size, fns, logit_softcap)
    return logps_N.new_zeros(labels_RT.shape).masked_scatter(scored_RT, logps_N)


def sequence_sums(token_logps_RT, labels_RT, seq_index_RT, num_sequences: int):
    """(sum of log-probs [S], number of scored tokens [S]) per sequence from dense per-token log-probs."""
    scored_RT = labels_RT != IGNORE_INDEX
    logps_N, seq_N = token_logps_RT[scored_RT], seq_index_RT[scored_RT]
    sums_S = logps_N.new_zeros(num_sequences).index_add(0, seq_N, logps_N)
    counts_S = torch.bincount(seq_N, minlength=num_sequences).to(logps_N.dtype)
    return sums_S, counts_S


class LogProbHead(nn.Module):
    """forward(hidden [R, T, E], output weight [V, E], labels [R, T]) -> dense log-probs [R, T] (or [R, T, 2]
    with_correct). No parameters: the weight is passed in, so tied embeddings and sharded weights work.
    A module of its own so tensor parallel can re-lay out its input (sequence parallel gathers here)."""

    def __init__(self, chunk_size: int = 1024, with_correct: bool = False, logit_softcap: float | None = None):
        super().__init__()
        self.chunk_size = chunk_size
        self.with_correct = with_correct
        self.logit_softcap = logit_softcap  # the model's final_logit_softcapping (ModelWithHead sets it)
        self.fns = PLAIN

    def forward(self, hidden_RTE, weight_VE, labels_RT):
        return dense_token_logprobs(hidden_RTE, weight_VE, labels_RT, self.chunk_size, self.with_correct, self.fns,
                                    self.logit_softcap)

    def output_trailing_shape(self) -> tuple:
        """Shape of one position's output (pipeline stages declare it up front)."""
        return (2,) if self.with_correct else ()

    @staticmethod
    def output_dtype() -> torch.dtype:
        return torch.float32
