"""NeMo-Aligner keys we accept so NeMo command lines and configs run, but that change nothing here.

Two lists, with the reason for each:
- `IGNORED_KEYS` are declared in the schemas (so they type-check and `--help` can show them);
  `log_ignored_keys` names, once at start-up, those a run set to something other than their default.
- `NEMO_ONLY_KEYS` are the Megatron / Lightning keys of NeMo-Aligner's own config files (gpt_dpo.yaml and
  the others) that no schema declares: `strip_nemo_only_keys` takes them out of a raw config before it is
  validated (an unknown key is otherwise an error) and logs them once. Those in `MUST_BE_UNSET` would
  change the result if set, so a value there is an error instead of being dropped.
"""

import dataclasses
import logging

from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("nemo_aligner")

# dotted key (relative to the run config) -> why it does nothing here
IGNORED_KEYS = {
    "trainer.log_every_n_steps": "every step is logged to metrics.jsonl",
    "exp_manager.checkpoint_callback_params.always_save_nemo": "no .nemo files; checkpoints are DCP, exports HF",
    "exp_manager.checkpoint_callback_params.filename": "checkpoints are named step_<N>",
    "exp_manager.checkpoint_callback_params.model_parallel_size": "the layout is recorded with each checkpoint",
    "exp_manager.checkpoint_callback_params.save_best_model": "save_top_k keeps the best by monitor",
    "model.megatron_amp_O2": "master weights are always fp32",
    "model.mcore_gpt": "there is one GPT implementation",
    "model.activations_checkpoint_method": "activations_checkpoint_granularity recomputes every layer",
    "model.activations_checkpoint_num_layers": "activations_checkpoint_granularity recomputes every layer",
    "model.data.num_workers": "data is tokenised up front",
    "model.data.chat": "the row shape is detected per row",
}


# dotted key -> why it is dropped (keys of NeMo-Aligner's config files that no schema here declares)
NEMO_ONLY_KEYS = {
    "trainer.logger": "loggers come from exp_manager",
    "trainer.enable_checkpointing": "checkpoints come from exp_manager",
    "trainer.use_distributed_sampler": "the data-parallel split is ours",
    "trainer.max_epochs": "trainer.<algorithm>.max_epochs is the one read",
    "trainer.max_steps": "trainer.<algorithm>.max_steps is the one read",
    "trainer.limit_val_batches": "trainer.<algorithm>.limit_val_batches is the one read",
    "trainer.val_check_interval": "trainer.<algorithm>.val_check_interval is the one read",
    "trainer.gradient_clip_val": "trainer.<algorithm>.gradient_clip_val is the one read",
    "exp_manager.max_time_per_run": "trainer.max_time is the one read",
    "exp_manager.resume_from_checkpoint": "runs resume from their log dir's checkpoints (exp_manager.resume_if_exists)",
    "model.peft.restore_from_ckpt": "adapters are restored from a PEFT folder (model.peft.restore_from_path)",
    "model.peft.lora_tuning.layer_selection": "adapters go on every layer",
    "model.peft.lora_tuning.weight_tying": "adapters are not tied",
    "model.peft.lora_tuning.position_embedding_strategy": "adapters are not tied",
    "model.optim.bucket_cap_mb": "Megatron's distributed optimizer setting",
    "model.optim.overlap_grad_sync": "Megatron's distributed optimizer setting",
    "model.optim.overlap_param_sync": "Megatron's distributed optimizer setting",
    "model.optim.contiguous_grad_buffer": "Megatron's distributed optimizer setting",
    "model.data.splits_string": "splits are given per file in data_prefix",
    "model.data.pad_length_to_multiple_of": "rows are padded as the layout needs",
    "model.data.skip_warmup": "Megatron's indexed-dataset setting",
    "model.data.reset_position_ids": "positions restart per sequence in packed rows",
    "model.data.reset_attention_mask": "attention stays inside each sequence in packed rows",
    "model.data.eod_mask_loss": "only response tokens are scored",
    "model.data.index_mapping_dir": "no index files are written",
    "model.overwrite_base_config": "the checkpoint's architecture is read from its own config.json",
    "model.ub_tp_comm_overlap_cfg": "Transformer Engine's userbuffer settings",
    "precision": "trainer.precision is the one read",
}
# keys dropped only while unset (null / false / empty): set, they would change the result silently
MUST_BE_UNSET = {
    "exp_manager.resume_from_checkpoint": "set exp_manager.explicit_log_dir to the run to resume instead",
    "model.peft.restore_from_ckpt.checkpoint_dir": "give the adapters as a PEFT folder in model.peft.restore_from_path",
    "model.peft.lora_tuning.layer_selection": "adapters on selected layers are not supported; remove the key",
    "model.peft.lora_tuning.weight_tying": "tied adapters are not supported; remove the key",
}


# Lightning-level trainer keys that NeMo's files set to `${.<algorithm>.<key>}`: dropped when they are such an
# interpolation (or equal the algorithm's value); a literal that differs would be silently lost, so it is an error
LOOP_MIRRORS = ("trainer.max_epochs", "trainer.max_steps", "trainer.limit_val_batches", "trainer.val_check_interval",
                "trainer.gradient_clip_val")


def _check_mirror(trainer: DictConfig, leaf: str, key: str, loops=()) -> None:
    node = trainer._get_node(leaf)
    if node is not None and node._is_interpolation():
        return
    value = trainer[leaf]
    sections = list(loops) or [name for name in trainer.keys() if isinstance(trainer._get_node(name), DictConfig)]
    ours = [(name, trainer[name].get(leaf)) for name in sections if name in trainer and leaf in trainer[name]]
    if any(mine == value for _, mine in ours):
        return
    where = " or ".join(f"trainer.{name}.{leaf}" for name in sections) or f"trainer.<algorithm>.{leaf}"
    raise ValueError(f"{key}={value!r} is not read here (NeMo reads the algorithm's own); set {where} instead")


def strip_nemo_only_keys(raw: DictConfig, loops=()) -> DictConfig:
    """A copy of `raw` (unresolved) without the NEMO_ONLY_KEYS it holds; each dropped key logged once.
    ValueError naming the key when one of MUST_BE_UNSET is set, or a LOOP_MIRRORS key holds a literal its
    algorithm's section (`loops`: trainer.dpo, ...) does not."""
    raw = raw.copy()
    dropped = []
    for key, reason in NEMO_ONLY_KEYS.items():
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(raw, parent_key, default=None, throw_on_resolution_failure=False) if parent_key else raw
        if not isinstance(parent, DictConfig) or leaf not in parent:
            continue
        for bad, advice in MUST_BE_UNSET.items():
            if bad == key or bad.startswith(key + "."):
                value = OmegaConf.select(raw, bad, default=None, throw_on_resolution_failure=False)
                if value not in (None, False, "", [], {}):
                    raise ValueError(f"{bad}={value!r} is a NeMo setting without an equivalent here: {advice}")
        if key in LOOP_MIRRORS:
            _check_mirror(parent, leaf, key, loops)
        with open_dict(parent):
            parent.pop(leaf)
        dropped.append(f"{key} ({reason})")
    if dropped:
        log.info("NeMo-only keys accepted and ignored: %s", "; ".join(dropped))
    return raw


def loop_sections(schema) -> list[str]:
    """The trainer.<algorithm> sections of a run schema (dpo, sft, ...): its trainer's dataclass-valued fields."""
    trainer = next((f for f in dataclasses.fields(schema) if f.name == "trainer"), None)
    if trainer is None or trainer.default_factory is dataclasses.MISSING:
        return []
    value = trainer.default_factory()
    return [f.name for f in dataclasses.fields(value) if dataclasses.is_dataclass(getattr(value, f.name))]


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return dataclasses.MISSING
        obj = getattr(obj, part)
    return obj


def ignored_keys_set(cfg) -> dict[str, object]:
    """The ignored keys this config sets to a non-default value -> their value."""
    default = type(cfg)()
    out = {}
    for key in IGNORED_KEYS:
        value = _lookup(cfg, key)
        if value is not dataclasses.MISSING and value != _lookup(default, key):
            out[key] = value
    return out


def log_ignored_keys(cfg) -> None:
    for key, value in ignored_keys_set(cfg).items():
        log.info("%s=%r is accepted for NeMo compatibility and ignored: %s", key, value, IGNORED_KEYS[key])
