"""NeMo-Aligner keys we accept so NeMo command lines and configs run, but that change nothing here.

One list, with the reason for each. They are declared in the schemas (so they type-check and `--help`
can show them); `log_ignored_keys` names, once at start-up, those a run set to something other than
their default.
"""

import dataclasses
import logging

log = logging.getLogger("nemo_aligner")

# dotted key (relative to the run config) -> why it does nothing here
IGNORED_KEYS = {
    "trainer.log_every_n_steps": "every step is logged to metrics.jsonl",
    "exp_manager.checkpoint_callback_params.always_save_nemo": "no .nemo files; checkpoints are DCP, exports HF",
    "exp_manager.checkpoint_callback_params.save_hf_every_checkpoint": "not implemented yet: only the final hf/",
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
