"""`nemo-aligner export`: one checkpoint of a training run (the best, the latest, or a named one) to a Hugging
Face folder, in one process whatever layout wrote it (DCP reshards on load).

The run is rebuilt from the config stored with the checkpoint (trainer_state.json: the run's flattened
config), so the export needs nothing but the log dir; relative paths in that config (the pretrained
checkpoint, a tokenizer) are read from the current directory, as the run read them. The folder is what the
run's own hf/ would have been at that step: the same writer (parallel.export.export_hf), dtype rule
(model.export_dtype, else the checkpoint's) and carried files (generation_config.json, tokenizer files).
"""

import logging
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nemo_aligner.config import ConfigError, load_config
from nemo_aligner.config.dpo import DPORunConfig
from nemo_aligner.config.export import ExportConfig
from nemo_aligner.config.grpo import GRPORunConfig
from nemo_aligner.config.rm import RMRunConfig
from nemo_aligner.config.sft import SFTRunConfig
from nemo_aligner.models.hf.peft import setup_peft
from nemo_aligner.models.score import CAUSAL_LM, SEQUENCE_CLASSIFICATION
from nemo_aligner.parallel.export import export_hf
from nemo_aligner.parallel.mesh import Parallel
from nemo_aligner.recipes.skeleton import build_model, export_dtype, load_tokenizer, setup_logging, user_errors_exit
from nemo_aligner.training.checkpoint import Checkpointer, read_state

log = logging.getLogger("nemo_aligner")

# trainer.<section> of a stored config -> (run schema, model task)
# (PPO's checkpoints hold actor and critic in one module: its hf/ and critic/ come from the run itself)
RECIPES = {"dpo": (DPORunConfig, CAUSAL_LM), "sft": (SFTRunConfig, CAUSAL_LM), "rm": (RMRunConfig, SEQUENCE_CLASSIFICATION),
           "grpo": (GRPORunConfig, CAUSAL_LM)}


def pick_checkpoint(run_dir: Path, which: str) -> Path:
    """best (by the monitored value stored with each checkpoint, the run's mode) | latest | step_N | a folder."""
    checkpoints = Checkpointer(run_dir / "checkpoints")
    done = checkpoints.complete()
    if Path(which).is_dir():
        return Path(which)
    if not done:
        raise FileNotFoundError(f"{run_dir / 'checkpoints'}: no complete checkpoint to export (was "
                                "exp_manager.create_checkpoint_callback false? the run's final model is in hf/)")
    if which == "latest":
        return checkpoints.latest() or done[-1]
    if which == "best":
        scored = [(read_state(p).get("monitor_value"), p) for p in done]
        scored = [(v, p) for v, p in scored if v is not None]
        if not scored:
            log.info("no checkpoint has a monitored value (no validation ran): exporting the latest")
            return done[-1]
        mode = read_state(scored[-1][1]).get("config", {}).get("exp_manager.checkpoint_callback_params.mode", "min")
        return (max if mode == "max" else min)(scored, key=lambda vp: vp[0])[1]
    named = [p for p in done if p.name == which or p.name == f"step_{int(which[5:]):08d}"
             ] if which.startswith("step_") and which[5:].isdigit() else []
    if not named:
        raise ValueError(f"checkpoint={which!r}: expected best, latest, step_N or a checkpoint folder; "
                         f"{run_dir / 'checkpoints'} holds {[p.name for p in done]}")
    return named[0]


def run_config_of(checkpoint: Path):
    """(run config, model task) from the flattened config stored with the checkpoint."""
    flat = read_state(checkpoint).get("config")
    if not flat:
        raise ValueError(f"{checkpoint}: its trainer_state.json holds no run config (written by an older version); "
                         "rerun the training command instead")
    sections = {key.split(".")[1] for key in flat if key.startswith("trainer.") and key.count(".") >= 2}
    recipe = next((name for name in RECIPES if name in sections), None)
    if recipe is None:
        raise ValueError(f"{checkpoint}: a run of a recipe this command cannot export (trainer sections {sorted(sections)}; "
                         f"supported: {list(RECIPES)})")
    schema, task = RECIPES[recipe]
    nested = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return load_config(nested, schema), task


def export_checkpoint(cfg: ExportConfig) -> Path:
    if not cfg.run_dir:
        raise ConfigError("run_dir=... is required: a training run's log dir (its exp_manager.explicit_log_dir)")
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir={run_dir}: not a directory")
    checkpoint = pick_checkpoint(run_dir, cfg.checkpoint)
    run_cfg, task = run_config_of(checkpoint)
    model_cfg = run_cfg.model
    if cfg.merge_on_export is not None:
        model_cfg.peft.merge_on_export = cfg.merge_on_export
    restore = run_cfg.pretrained_checkpoint.restore_from_path
    tokenizer = load_tokenizer(model_cfg, restore)
    torch.manual_seed(model_cfg.seed)
    model = build_model(model_cfg, restore, tokenizer, torch.device("cpu"), task=task)
    setup_peft(model, model_cfg.peft, seed=model_cfg.seed)
    state = Checkpointer.load_weights(checkpoint, model)
    if run_cfg.model.data.chat_template is not None:  # the template the run trained with, as its hf/ carries
        tokenizer.chat_template = run_cfg.model.data.chat_template
    out = Path(cfg.output_dir) if cfg.output_dir else run_dir / f"hf_{checkpoint.name}"
    dtype = cfg.export_dtype or export_dtype(model_cfg, restore)
    export_hf(Parallel(), model, out, tokenizer, model_cfg.peft, restore, dtype=dtype)
    log.info("exported %s (step %s) to %s (%s)", checkpoint, state.get("step"), out, dtype)
    return out


def main(argv: list[str] | None = None) -> Path:
    """`nemo-aligner export key=value ...` (ExportConfig's keys)."""
    setup_logging()
    with user_errors_exit():
        argv = list(sys.argv[1:] if argv is None else argv)
        bad = [a for a in argv if "=" not in a]
        if bad:
            raise ConfigError(f"expected key=value arguments (run_dir=..., checkpoint=..., output_dir=...), got {bad}")
        raw = OmegaConf.from_dotlist([a.lstrip("+") for a in argv])
        return export_checkpoint(load_config(raw, ExportConfig))
