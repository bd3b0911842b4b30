"""The DPO reference policy, three ways that give the same numbers (model.dpo.ref_mode):

- precompute: one forward-only pass of the initial policy before training (LoRA adapters off) over the
  training pairs and the validation items that validation reads (none when it is off), kept beside
  the pairs and cached in safetensors keyed by model, data, layout and settings; no reference weights
  are held while training;
- online: a frozen copy of the initial policy, laid out like it, run before each step;
- adapter (LoRA): the policy itself with its adapters switched off, run before each step.
Reference-free losses (SimPO, ORPO) need none of them.
"""

import contextlib
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from nemo_aligner.algorithms.dpo import reference_pair_sums
from nemo_aligner.models.lora import adapters_disabled, set_adapters_enabled

log = logging.getLogger("nemo_aligner")


class ModelReference:
    """Reference log-probs from a module, for a whole global batch in one forward-only pass: a frozen copy
    (adapters permanently off, so with LoRA it is the base model) or the policy with adapters off."""

    def __init__(self, module, frozen_copy: bool):
        self.module = module
        self.frozen_copy = frozen_copy
        if frozen_copy:
            set_adapters_enabled(module, False)

    def fill(self, batches, executor) -> None:
        context = contextlib.nullcontext() if self.frozen_copy else adapters_disabled(self.module)
        with context:
            refs = executor.forward_only(self.module, batches, reference_pair_sums)
        for batch, ref in zip(batches, refs):
            batch.ref_chosen, batch.ref_rejected = ref[:, 0], ref[:, 1]


def precompute_reference(run, layout, make_batch, micro_batch_size: int) -> None:
    """layout.dataset.ref_chosen / ref_rejected from the (not yet trained) policy with adapters off, for the
    pairs of `layout.items`; pairs the layout leaves out (validation items no check reads) are NaN, so a
    use of one could not pass for a value."""
    with adapters_disabled(run.policy):
        values = run.forward_only_items(run.policy, layout, micro_batch_size, make_batch, reference_pair_sums)
    covered = np.zeros(len(layout.dataset), dtype=bool)
    covered[[i for item in layout.items for i in (item if layout.packed else [item])]] = True
    values[~covered] = np.nan
    layout.dataset.ref_chosen, layout.dataset.ref_rejected = values[:, 0].copy(), values[:, 1].copy()


def model_identity(model_config: dict, seed: int, restore_from_path: str | None) -> str:
    """A cheap, stable description of the initial weights: the checkpoint's files (name, size, mtime), or
    the architecture and seed of a model built from scratch."""
    if restore_from_path:
        files = sorted(Path(restore_from_path).glob("*.safetensors")) + [Path(restore_from_path) / "config.json"]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return json.dumps({"path": str(Path(restore_from_path).resolve()), "files": stats})
    return json.dumps({"scratch": model_config, "seed": seed}, sort_keys=True)


def cache_key(*parts) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:24]


def cached_reference(run, layouts: dict, make_batch, micro_batch_size: int, cache_dir: Path, identity: str,
                     precision: str, is_rank_zero: bool) -> None:
    """precompute_reference for each named layout, read from `cache_dir` when an identical run cached it."""
    for name, layout in layouts.items():
        if layout is None:
            continue
        # the layout's rounding (packed, shared prompt) and the items covered are part of what was computed
        key = cache_key(identity, layout.dataset.fingerprint, precision, layout.packed,
                        getattr(layout.dataset, "shared_prompt", False), len(layout.items))
        path = cache_dir / f"{name}-{key}.safetensors"
        if run.all_ranks_have(path):
            cached = load_file(path)
            layout.dataset.ref_chosen, layout.dataset.ref_rejected = cached["chosen"], cached["rejected"]
            log.info("reference log-probs for %s: loaded from %s", name, path)
            continue
        precompute_reference(run, layout, make_batch, micro_batch_size)
        if is_rank_zero:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"chosen": layout.dataset.ref_chosen, "rejected": layout.dataset.ref_rejected}, tmp)
            tmp.replace(path)
            log.info("reference log-probs for %s: computed for %d items, cached in %s", name, len(layout.items), path)
