"""Per-token log-probs of a rollout's completions from a frozen module, in one forward-only pass: the
reference policy (a frozen copy laid out like the policy, or the policy itself with its LoRA adapters
off), or any other frozen model ending in a per-token head."""

import contextlib

from nemo_aligner.models.lora import adapters_disabled, set_adapters_enabled
from nemo_aligner.rollout.batch import per_sequence


class RolloutReference:
    def __init__(self, module, frozen_copy: bool):
        """module: a ModelWithHead whose head's output [..., 0] is the per-token log-prob (PolicyHead);
        frozen_copy: its adapters are switched off for good (a copy), else only during each pass."""
        self.module, self.frozen_copy = module, frozen_copy
        if frozen_copy:
            set_adapters_enabled(module, False)

    def fill(self, dataset, batches, executor, name: str = "ref_logps") -> None:
        """Set `name` ([L] per completion) on the examples of `batches` (micro-batches of `dataset`)."""
        context = contextlib.nullcontext() if self.frozen_copy else adapters_disabled(self.module)
        with context:
            outs = executor.forward_only(self.module, batches, lambda b, out: per_sequence(out[..., 0], b)[0])
        for batch, values_SL in zip(batches, outs):
            dataset.set_per_token(name, batch.example_indices, values_SL)
