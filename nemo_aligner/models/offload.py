"""A frozen model's weights on the CPU while another phase runs (NeMo-Aligner offloads its reference policy
between PPO's phases); the optimiser's side is `training.optim.optimizer_state_on`.

    with resident(reward_model_module, device):   # on `device` inside, on the CPU outside
        scores = ...

A no-op when the device is the CPU (the weights never move). DTensor parameters (tensor parallel, FSDP) move
their local shards.
"""

import contextlib

import torch
from torch import nn


def move_module(module: nn.Module, device) -> None:
    """Parameters and buffers of `module` to `device`, in place (the Parameter objects stay, so optimisers and
    hooks keep pointing at them)."""
    device = torch.device(device)
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.device != device:
            tensor.data = tensor.data.to(device, non_blocking=True)


@contextlib.contextmanager
def resident(module: nn.Module | None, device, enabled: bool = True):
    """`module` on `device` inside the block and on the CPU after it (when enabled and device is not the CPU)."""
    device = torch.device(device)
    if module is None or not enabled or device.type == "cpu":
        yield
        return
    move_module(module, device)
    try:
        yield
    finally:
        move_module(module, "cpu")
