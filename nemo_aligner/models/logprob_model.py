"""TokenLogProbModel: a GPTModel (or one pipeline stage of it) whose forward ends in per-token log-probs.

Training needs log-probs, not hidden states. Putting the chunked output projection inside one
module's forward is what lets wrappers treat "model + head" as a unit: FSDP2 gathers the output
weight for the forward that uses it, and a pipeline's last stage emits a fixed-shape [R, T] tensor
(log-prob at scored positions, 0 elsewhere) that the loss reads. Not parallel code itself.

Shapes: R rows, T tokens, E hidden, V vocabulary.
"""

import torch
from torch import nn

from nemo_aligner.losses.logprobs import dense_token_logprobs


class LogProbHead(nn.Module):
    """No parameters: the output weight is passed in, so tied embeddings and tensor-parallel shards work.

    A module of its own so tensor parallel can re-lay out its input (sequence parallel gathers here).
    """

    def __init__(self, chunk_size: int = 1024, with_correct: bool = False, logit_softcap: float | None = None):
        super().__init__()
        self.chunk_size = chunk_size
        self.with_correct = with_correct
        self.logit_softcap = logit_softcap  # the model's final_logit_softcapping (Gemma 2)

    def forward(self, hidden_RTE, weight_VE, labels_RT):
        return dense_token_logprobs(hidden_RTE, weight_VE, labels_RT, self.chunk_size, self.with_correct,
                                    self.logit_softcap)


class TokenLogProbModel(nn.Module):
    """forward(inputs, labels, position_ids, segment_ids) -> [R, T] log-probs (last stage) or hidden states.

    `model` may be a pruned pipeline stage: without `embedding` it takes hidden states, and with
    `is_last=False` it returns hidden states for the next stage.
    """

    def __init__(self, model, chunk_size: int = 1024, is_last: bool = True, with_correct: bool = False):
        super().__init__()
        self.model = model
        self.head = LogProbHead(chunk_size, with_correct, model.config.final_logit_softcapping) if is_last else None
        # Hidden states cross pipeline stages in the parameters' dtype (the residual stream's dtype, also
        # under autocast), so a stage's declared output shape and dtype hold for every micro-batch.
        self.activation_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    @property
    def config(self):
        return self.model.config

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def forward(self, inputs, labels=None, position_ids=None, segment_ids=None):
        hidden_RTE = self.model(inputs, position_ids=position_ids, segment_ids=segment_ids)
        if self.head is None:
            return hidden_RTE.to(self.activation_dtype)
        return self.head(hidden_RTE, self.model.output_weight, labels)

    def output_trailing_shape(self) -> tuple:
        """Shape of one position's output: (E,) for a middle stage, () or (2,) for the last."""
        if self.head is None:
            return (self.config.hidden_size,)
        return (2,) if self.head.with_correct else ()

    def output_dtype(self) -> torch.dtype:
        return torch.float32 if self.head is not None else self.activation_dtype
