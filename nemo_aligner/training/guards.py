"""Guards against training that has gone wrong without saying so.

- A non-finite loss or gradient norm stops the run *before* the optimiser applies the step
  (`check_finite`), with a message naming the step and the metric (NonFiniteError, a user-facing error:
  one message, non-zero exit). Nothing is saved or exported from such a state, and `weights_finite` is
  checked before every checkpoint and export as a last line of defence (an update can overflow weights
  whose gradients were finite).
- A gradient norm of exactly 0 for DEAD_STEPS steps in a row while the loss is not 0 means nothing is
  learning (saturated softmax, weights blown up with clipping off): `DeadGradientWatch` warns, once.
"""

import logging
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

log = logging.getLogger("nemo_aligner")
DEAD_STEPS = 3


class NonFiniteError(ValueError):
    """Training produced NaN/inf; the message names the step and the metric and what to do."""


def non_finite(metrics: dict, names) -> list[tuple[str, float]]:
    """(name, value) of the metrics among `names` that are NaN or infinite."""
    out = []
    for name in names:
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not math.isfinite(value):
            out.append((name, value))
    return out


def check_finite(step: int, metrics: dict, names, prefix: str, advice: str) -> None:
    """Raise NonFiniteError when one of `names` in `metrics` is not finite (prefix: "train/", "val/")."""
    bad = non_finite(metrics, names)
    if bad:
        what = ", ".join(f"{prefix}{name} = {value}" for name, value in bad)
        raise NonFiniteError(f"step {step}: {what} (not finite); the run stops before anything is saved or "
                             f"exported from it. {advice}")


@torch.no_grad()
def weights_finite(model) -> bool:
    """True when every parameter of this rank's model is finite, on every rank (collective when distributed)."""
    ok = True
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        if local.numel() and not bool(torch.isfinite(local).all()):
            ok = False
            break
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


class DeadGradientWatch:
    """Warns once when the gradient norm has been exactly 0 for DEAD_STEPS steps while the loss is not 0."""

    def __init__(self, steps: int = DEAD_STEPS):
        self.steps = steps
        self.run_length = 0
        self.warned = False

    def update(self, step: int, grad_norm: float, loss: float) -> None:
        self.run_length = self.run_length + 1 if grad_norm == 0.0 and loss != 0.0 else 0
        if self.run_length >= self.steps and not self.warned:
            self.warned = True
            log.warning("warning: the gradient norm has been exactly 0 for %d steps (steps %d-%d) while train/loss "
                        "is %.4g, not 0: nothing is learning (saturated outputs or blown-up weights, e.g. a too "
                        "high model.optim.lr with gradient clipping off); check train/loss and lower the lr",
                        self.run_length, step - self.run_length + 1, step, loss)
