"""ModelWithHead: a GPTModel (or one pipeline stage of it) whose forward ends in what an algorithm needs.

Training needs log-probs (or scores), not hidden states. Putting the head inside one module's forward
is what lets wrappers treat "model + head" as a unit: FSDP2 gathers the output weight for the forward
that uses it, and a pipeline's last stage emits the head's fixed-shape output (e.g. [R, T] log-probs at
scored positions) that the loss reads. The head is any module called as
`head(hidden_RTE, output_weight_VE, labels_RT)` that declares `output_trailing_shape()` and
`output_dtype()` (e.g. `losses.logprobs.LogProbHead`). A head that projects to the vocabulary declares
`logit_softcap`, and gets the model's `final_logit_softcapping` here: the model decides how its logits
are capped, whichever head computes them. Not parallel code itself.

Shapes: R rows, T tokens, E hidden, V vocabulary.
"""

import torch
from torch import nn


class ModelWithHead(nn.Module):
    """forward(inputs, labels, position_ids, segment_ids, branch_ids) -> the head's output (last stage) or hidden
    states (the layout tensors are `data.batch.Batch.model_inputs()`).

    `model` may be a pruned pipeline stage: without `embedding` it takes hidden states, and with
    `head=None` (not the last stage) it returns hidden states for the next stage.
    """

    def __init__(self, model, head: nn.Module | None):
        super().__init__()
        self.model = model
        self.head = head
        if head is not None and hasattr(head, "logit_softcap"):
            head.logit_softcap = getattr(model.config, "final_logit_softcapping", None)
        # Hidden states cross pipeline stages in the parameters' dtype (the residual stream's dtype, also
        # under autocast), so a stage's declared output shape and dtype hold for every micro-batch.
        self.activation_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    @property
    def config(self):
        return self.model.config

    @property
    def is_last(self) -> bool:
        return self.head is not None

    def forward(self, inputs, labels=None, position_ids=None, segment_ids=None, branch_ids=None):
        hidden_RTE = self.model(inputs, position_ids=position_ids, segment_ids=segment_ids, branch_ids=branch_ids)
        if self.head is None:
            return hidden_RTE.to(self.activation_dtype)
        return self.head(hidden_RTE, self.model.output_weight, labels)

    def output_trailing_shape(self) -> tuple:
        """Shape of one position's output: (E,) for a middle stage, the head's for the last."""
        if self.head is None:
            return (self.config.hidden_size,)
        return self.head.output_trailing_shape()

    def output_dtype(self) -> torch.dtype:
        return self.head.output_dtype() if self.head is not None else self.activation_dtype
