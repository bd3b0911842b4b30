"""`torch.compile` of each transformer block (`model.compile: true`), applied to a built model.

Why per block and in place (`nn.Module.compile`):
- parameter names, state dicts, checkpoints and Hugging Face export are unchanged (no `_orig_mod.`);
- every block runs the same code with its parameters as graph inputs, so one compiled graph serves
  all layers instead of one compile per layer;
- the block's hooks are part of what is compiled; FSDP2's (gather and free a shard) are marked
  dynamo-disabled by torch, so they still run eagerly around the compiled forward;
- a deep copy (the online DPO reference) gets its own compiled blocks bound to its own weights.
The attention context (block-diagonal mask or varlen boundaries, with its host sync for max_seqlen)
is built once per forward outside the blocks. Activation checkpointing wraps the compiled block
(`checkpoint(layer, ...)` in GPTModel.forward), so the recompute in backward reruns compiled code.
Shapes that change between batches (padded lengths, max_seqlen of a pack) recompile once and are
then treated as dynamic.
"""

import logging

from torch import nn

from nemo_aligner.models.gpt import TransformerLayer

log = logging.getLogger(__name__)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The TransformerLayers of a GPTModel, or of anything that wraps one (log-prob head, pipeline stage)."""
    return [m for m in model.modules() if isinstance(m, TransformerLayer)]


def compile_blocks(model: nn.Module, backend: str = "inductor", **options) -> int:
    """Compile every transformer block of `model` in place; returns how many were compiled.

    options go to `torch.compile` (e.g. fullgraph=True, dynamic=True, mode="max-autotune-no-cudagraphs").
    """
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"model.compile=true but {type(model).__name__} has no transformer blocks to compile")
    for block in blocks:
        block.compile(backend=backend, **options)
    log.info("torch.compile (%s) applied to %d transformer blocks; the first steps include compilation",
             backend, len(blocks))
    return len(blocks)
