"""The algorithm protocol: what the training loop and the executors ask of DPO, SFT (and RM, GRPO, PPO).

The loop knows nothing of pairs, tokens or rewards. Per optimiser step it cuts the global batch of
items (`data.layout`) into micro-batches, asks the algorithm to collate them, counts the units the
loss is normalised by over the whole global batch (all data-parallel ranks), and hands the
micro-batches to the executor, which runs the model (ending in `algorithm.head()`) and calls
`algorithm.loss` on its outputs. Metric *sums* come back, are summed over micro-batches and ranks,
and `reduce_metrics` turns them into the logged means.

An online algorithm (GRPO, PPO) also implements `Online`: its data items are prompts, and each step it
makes this rank's batch of completions itself (`rollout`), which the loop then trains on for
`num_iterations` optimiser passes (`training.loop.Trainer.online_step`); validation is its own too.

Adding an algorithm = a config schema + a class implementing this protocol + a short recipe (see
docs/architecture.md).
"""

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from nemo_aligner.data.batch import Batch


@runtime_checkable
class Algorithm(Protocol):
    unit: str  # what the loss is normalised by, for logs ("pairs", "tokens", "sequences")
    headline_metrics: tuple[str, ...]  # metrics shown in the progress bar and the closing summary

    def head(self) -> nn.Module:
        """What the model's forward ends in (e.g. `losses.logprobs.LogProbHead`): its output is `loss`'s input."""

    def make_batch(self, dataset, items: list, packed: bool) -> Batch:
        """One micro-batch from items (example indices, or packs of them)."""

    def num_units(self, batch: Batch) -> int:
        """This micro-batch's count of what the loss is normalised by (pairs, response tokens, ...)."""

    def loss(self, batch: Batch, outputs: torch.Tensor, num_units_global: int) -> tuple[torch.Tensor, dict]:
        """(this micro-batch's share of the global-batch loss, metric sums) from the head's outputs."""

    def reduce_metrics(self, sums: dict, num_units_global: int) -> dict[str, float]:
        """Logged values from metric sums over the whole global batch."""


class Preparing(Protocol):
    """Optional: run before a step's (or a validation's) micro-batches, e.g. reference log-probs."""

    def prepare(self, batches: list[Batch], executor) -> None:
        ...


class Online(Protocol):
    """Optional: an algorithm whose steps produce their batch online (generate -> rewards -> advantages ->
    old / reference log-probs). The loop calls, per step:

        rollout = algorithm.rollout(prompts_dataset, items, step, run)   # this rank's share of `items`
        for _ in range(algorithm.num_iterations):                       # passes over it
            for mini in num_mini_batches contiguous parts of it:         # optional attribute, default 1
                ... make_batch(rollout.dataset, micro, packed) -> forward/backward -> optimizer.step()
                algorithm.sync_weights(model)                           # the engine generates with the new weights

    `rollout` returns a `rollout.Rollout` (dataset, metrics, per-phase times). `validate(layout, count, run)`
    returns val/* metrics (e.g. the mean reward of generated completions) over the first `count` prompts
    (None = all)."""

    num_iterations: int

    def rollout(self, prompts, items: list, step: int, run):
        ...

    def sync_weights(self, model) -> None:
        ...

    def validate(self, layout, count, run) -> dict[str, float]:
        ...


def is_online(algorithm) -> bool:
    return callable(getattr(algorithm, "rollout", None))
