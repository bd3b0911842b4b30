"""What every training recipe shares, in two halves around the recipe's own part (its data and its
algorithm), and the entry scripts' wrapper:

    start = start_run(cfg)                     # logging, launch + layout, inputs checked, log dir locked, device,
                                               # precision, tokenizer, sequence length
    model = build_policy(start)                # this rank's model (pipeline stage), LoRA applied, everything seeded
    ... the recipe: data layouts, algorithm
    run = build_run(start, model, algorithm, layouts)   # the one run object; first, every check that needs the
                                               # data and the model (batch sizes, schedule, resume / refusal)
    ... the recipe's expensive work (DPO's reference pass)
    return train(start, run, algorithm, ...)   # optimiser, schedule, checkpoints, logger, resume, fit (signals,
                                               # max_time, non-finite guard), test split, export

    main_entry(raw, DPORunConfig, run_dpo, demo=CONF / "demo/gpt_dpo.yaml")   # an entry script's whole main()

One process or many, the same calls: the parallel layout lives in `start.parallel` and the run object.
A recipe that makes these calls gets every guarantee of docs/runs.md without code of its own.
"""

import contextlib
import dataclasses
import hashlib
import importlib.util
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nemo_aligner.config import ConfigError, load_config
from nemo_aligner.config.nemo_compat import log_ignored_keys
from nemo_aligner.config.presets import is_demo_run, with_preset
from nemo_aligner.config.resolvers import DEMO_ASSETS
from nemo_aligner.config.sections import LoopConfig, parse_max_time
from nemo_aligner.data.dataset import files_digest
from nemo_aligner.data.layout import layout
from nemo_aligner.data.rows import check_data_files, split_files
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.generation.validation import validation_samples
from nemo_aligner.models.compile import compile_blocks
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf import checkpoint_dtype, config_from_pretrained, load_pretrained
from nemo_aligner.models.hf.common import check_weight_files, folder_fingerprint
from nemo_aligner.models.hf.peft import setup_peft
from nemo_aligner.models.score import CAUSAL_LM, model_class
from nemo_aligner.parallel.export import export_hf
from nemo_aligner.parallel.mesh import Parallel, init_parallel
from nemo_aligner.parallel.run import ParallelRun, stage_pruner
from nemo_aligner.training.checkpoint import Checkpointer
from nemo_aligner.training.guards import NonFiniteError, weights_finite
from nemo_aligner.training.logging import MetricsLogger, ProgressBar
from nemo_aligner.training.loop import Trainer, TrainingPlan
from nemo_aligner.training.optim import (
    build_optimizer, build_scheduler, check_optimizer_settings, check_schedule, schedule_warning,
)
from nemo_aligner.training.run_dir import (
    Resume, acquire_lock, decide_resume, flatten, mark_finished, release_lock,
)
from nemo_aligner.training.signals import EXIT_STOPPED, StopWatch

log = logging.getLogger("nemo_aligner")
EXIT_USER_ERROR = 1  # a config, data, path, checkpoint or option error: one message on stderr
TRACEBACK_ENV = "NEMO_ALIGNER_TRACEBACK"  # =1: user errors show their traceback too
USER_ERRORS = (ValueError, OSError, ImportError)  # ConfigError, DataError, NonFiniteError are ValueErrors; ImportError: a missing optional extra
# what a checkpoint's identity leaves out: memory and speed knobs, and where data comes from (compared by content)
NOT_ARCHITECTURE = ("activations_checkpointing",)
NOT_TOKENISATION = ("data_prefix", "data_impl", "num_workers", "shuffle", "packing", "pack_size", "packing_algorithm")
NOT_LOSS = ("chunk_size",)
ADAPTER_SHAPE = ("target_modules", "adapter_dim", "alpha")
SPLITS = ("train", "validation", "test")
DEMO_TOKENIZER = DEMO_ASSETS / "tokenizer"  # ships in the wheel
# GPTConfig fields that are not model.* keys of the same name, and where they come from
DERIVED_GPT_FIELDS = {
    "activations_checkpointing": "model.activations_checkpoint_granularity is not null",
    "vocab_size": "model.vocab_size, else the tokenizer's vocabulary size",
}


@dataclass
class RunStart:
    """What every recipe sets up first, in the same order."""

    cfg: object
    parallel: Parallel
    restore: str | None
    log_dir: Path
    device: torch.device
    autocast: object
    tokenizer: Tokenizer
    started_at: float = dataclasses.field(default_factory=time.monotonic)  # trainer.max_time counts from here
    plan: TrainingPlan | None = None  # set by build_run: steps, validation cadence
    identity: dict | None = None  # set by build_run: what made this run (stored with every checkpoint)
    resume: Resume | None = None  # set by build_run: where the run starts, and whether it is already finished


def start_run(cfg) -> RunStart:
    """Logging, the launch and its parallel layout, the inputs (checkpoint folders, data files, optional
    packages) checked, the output folder created and locked, device, precision context, tokenizer and the
    sequence length (capped at the model's max_position_embeddings) -- all before anything expensive."""
    started_at = time.monotonic()
    setup_logging()
    parallel = init_parallel(cfg.trainer, cfg.model)  # joins the process group when launched with several
    if not parallel.is_rank_zero:
        log.setLevel(logging.WARNING)
    log_ignored_keys(cfg)
    check_inputs(cfg)
    restore = cfg.pretrained_checkpoint.restore_from_path
    device = pick_device(cfg.trainer.accelerator)
    log_dir = open_log_dir(cfg.exp_manager, parallel)
    tokenizer = load_tokenizer(cfg.model, restore)
    cap_seq_length(cfg, restore)
    return RunStart(cfg, parallel, restore, log_dir, device, autocast_for(cfg.trainer.precision, device), tokenizer,
                    started_at)


def build_policy(start: RunStart, task: str = CAUSAL_LM) -> GPTModel:
    """This rank's model: read from the checkpoint (a pipeline stage reads only its own layers) or built
    from model.*; LoRA adapters added when model.peft.peft_scheme=lora. model.seed seeds every RNG first, so
    anything random (a from-scratch init, adapter dropout) is the same run to run, with or without a
    checkpoint; adapter inits are seeded by (seed, module name)."""
    model_cfg = start.cfg.model
    seed_everything(model_cfg.seed)
    model = build_model(model_cfg, start.restore, start.tokenizer, start.device, prune=stage_pruner(start.parallel),
                        task=task)
    setup_peft(model, model_cfg.peft, seed=model_cfg.seed)  # model.peft.peft_scheme=lora: adapters added, base frozen
    start.parallel.dims.check_model(model.config)
    log.info("model: %s parameters%s, %s", f"{model.num_parameters():,}",
             " (this pipeline stage)" if start.parallel.dims.pp > 1 else "",
             f"from {start.restore}" if start.restore else "built from model.* (no checkpoint)")
    return model


def build_run(start: RunStart, model, algorithm, layouts) -> ParallelRun:
    """The run object for `model` ending in `algorithm.head()`; `layouts` (train first, then the other splits,
    None for a missing one) fix the longest row a pipeline stage exchanges. Every recipe calls this last before
    its expensive work, so it first checks what needs the data and the model (`check_run`)."""
    check_run(start, model, algorithm, layouts)
    max_rows = max(layout.max_row_tokens() for layout in layouts if layout is not None)
    return ParallelRun(start.parallel, model, algorithm.head(), autocast=start.autocast, max_row_tokens=max_rows)


def check_run(start: RunStart, model, algorithm, layouts) -> None:
    """The batch layout against the training data (a dataset smaller than one global batch fails here, not
    after the reference pass), the optimiser and schedule settings (a schedule whose phases do not fit is
    shown with its lr curve), and the log dir: resume from this run's checkpoint, refuse someone else's, move
    an old run aside, or recognise a finished one. Sets start.plan, start.identity and start.resume."""
    cfg = start.cfg
    loop_cfg = loop_config(cfg)
    start.plan = training_plan(cfg, loop_cfg, layouts[0], start.parallel.dims.dp, algorithm)
    check_optimisation(cfg, start.plan)
    start.identity = run_identity(start, model, algorithm, layouts[0])
    exp = cfg.exp_manager
    checkpoints = exp.create_checkpoint_callback
    start.resume = decide_resume(start.log_dir, resume=exp.resume_if_exists and checkpoints,
                                 ignore_no_checkpoint=exp.resume_ignore_no_checkpoint or not checkpoints,
                                 identity=start.identity, config=flat_config(cfg), max_steps=start.plan.max_steps,
                                 is_rank_zero=start.parallel.is_rank_zero)


def used_splits(cfg, loop_cfg) -> dict[str, list[str]]:
    """split -> files of model.data.data_prefix for the splits this run uses: train; validation unless
    trainer.<algorithm>.limit_val_batches=0 (no work for a split nobody evaluates); test when given (evaluated
    once at the end). A split given with weights is a data.rows.BlendFiles drawn with model.seed."""
    prefix = cfg.model.data.data_prefix
    files = {split: split_files(prefix, split, cfg.model.seed) if prefix is not None else [] for split in SPLITS}
    if loop_cfg.limit_val_batches == 0:
        files["validation"] = []
    return files


def split_layouts(cfg, loop_cfg, read, default_pack_size: int) -> tuple:
    """(train, validation or None, test or None) for the splits this run uses (`used_splits`): `read(files, key)`
    gives the dataset of train and of every other split that has files; one item per example, or with
    model.data.packing packed into model.data.pack_size (null: `default_pack_size`) tokens."""
    data, model = cfg.model.data, cfg.model
    files = used_splits(cfg, loop_cfg)
    out = []
    for split in SPLITS:
        dataset = read(files[split], f"model.data.data_prefix.{split}") if files[split] or split == "train" else None
        out.append(layout(dataset, packing=data.packing, pack_size=data.pack_size or default_pack_size,
                          algorithm=data.packing_algorithm, seed=model.seed, name=split))
    return tuple(out)


def data_metrics(layout) -> dict:
    """What every step logs about the training data: truncated / dropped rows, examples per pack."""
    out = layout.dataset.report.metrics()
    if layout.packed:
        out[f"data/{layout.dataset.unit}_per_pack"] = layout.examples_per_item()
    return out


def train(start: RunStart, run, algorithm, train_data, val_data, loop_cfg, tokenizer=None, test_data=None) -> dict:
    """Optimiser, schedule, checkpoints, logger and progress; resume; fit (stopping cleanly on SIGTERM / SIGUSR1 /
    trainer.max_time, and on a non-finite loss or gradient); the test split; Hugging Face export; summary.
    loop_cfg: trainer.<algorithm>; tokenizer: what hf/ carries (default the run's); test_data: evaluated once
    at the end (test/* metrics in the last step's record). result["stopped"] names why a run stopped early
    (the entry script then exits with EXIT_STOPPED); result["nothing_to_do"] is true for a rerun of a finished
    run."""
    if start.resume is None:  # a caller that built its run object without build_run
        check_run(start, run.model, algorithm, (train_data, val_data, test_data))
    if start.resume.finished:
        return nothing_to_do(start)
    cfg, model, log_dir = start.cfg, run.model, start.log_dir
    exp, optim, resume = cfg.exp_manager, cfg.model.optim, start.resume
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=tuple(optim.betas), eps=optim.eps)
    plan = training_plan(cfg, loop_cfg, train_data, run.dp.size, algorithm)
    sched = optim.sched
    scheduler = build_scheduler(optimizer, name=sched.name, max_steps=sched.max_steps or plan.max_steps,
                                warmup_steps=sched.warmup_steps, constant_steps=sched.constant_steps,
                                min_lr=sched.min_lr, warn=False)  # check_run has shown any warning
    params = exp.checkpoint_callback_params
    checkpointer = (Checkpointer(log_dir / "checkpoints", params.save_top_k, params.monitor, params.mode,
                                 topology=run.topology()) if exp.create_checkpoint_callback else None)
    is_rank_zero = start.parallel.is_rank_zero
    logger = MetricsLogger(log_dir, tensorboard=exp.create_tensorboard_logger, wandb=exp.create_wandb_logger,
                           wandb_kwargs=dataclasses.asdict(exp.wandb_logger_kwargs), run_config=dataclasses.asdict(cfg),
                           resume_step=resume.step, is_rank_zero=is_rank_zero)
    progress = ProgressBar(total=plan.max_steps, initial=resume.step, enabled=exp.progress_bar and is_rank_zero)
    stop = StopWatch(parse_max_time(cfg.trainer.max_time) if cfg.trainer.max_time else None, start.started_at)
    samples = validation_samples(start, run, val_data, resume.step)  # exp_manager.val_samples (None when off)
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=scheduler, run=run,
                      train_data=train_data, val_data=val_data, loop=loop_cfg, plan=plan, logger=logger,
                      progress=progress, checkpointer=checkpointer, monitor=params.monitor,
                      data_metrics=data_metrics(train_data), stop=stop, identity=start.identity,
                      run_config=flat_config(cfg), test_data=test_data, after_validation=samples,
                      after_save=hf_every_checkpoint(start, run, tokenizer))
    if resume.checkpoint is not None:
        trainer.resume(resume.checkpoint)
    log.info("training: %d steps (%d per epoch), global batch %d %s, micro batch %d, loss per %s, log dir %s",
             plan.max_steps, plan.sampler.steps_per_epoch, cfg.model.global_batch_size,
             getattr(algorithm, "batch_unit", "packs" if train_data.packed else train_data.dataset.unit),
             cfg.model.micro_batch_size,
             algorithm.unit.rstrip("s"), log_dir)
    with stop:  # SIGTERM / SIGUSR1 stop the loop after the current step (training.signals)
        result = trainer.fit()
    result.update(log_dir=str(log_dir), resumed=resume.checkpoint is not None, history=trainer.history,
                  hf_dir=None, checkpoint=trainer.last_saved)
    progress.close()
    if samples is not None:
        samples.close()
    logger.close()
    if result["stopped"] is not None:
        return stopped(start, result)
    hf_dir = export(start, run, tokenizer, result["steps"])
    result["hf_dir"] = str(hf_dir) if hf_dir else None
    log.info(summary(result, algorithm.headline_metrics, log_dir))
    release_lock(log_dir)
    return result


def export(start: RunStart, run, tokenizer, step: int) -> Path | None:
    """hf/ (LoRA: a PEFT adapter folder, or merged) and any further models of the run (`run.exports()`: PPO's
    critic/) unless the user turned it off (exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false),
    then finished.json: a rerun of this command has nothing to do (and writes nothing)."""
    if not weights_finite(run.model):
        raise NonFiniteError(f"step {step}: the weights hold NaN or inf values; nothing is exported")
    if not start.cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end:
        log.info("no hf/ export: exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false")
        if start.parallel.is_rank_zero:
            mark_finished(start.log_dir, step, None)
        return None
    tokenizer = tokenizer or start.tokenizer
    dtype = export_dtype(start.cfg.model, start.restore)
    hf_dir = export_hf(start.parallel, getattr(run, "actor", run.model), start.log_dir / "hf", tokenizer,
                       start.cfg.model.peft, start.restore, dtype=dtype)
    for name, (model, source) in (run.exports() if hasattr(run, "exports") else {}).items():  # PPO: critic/
        export_hf(start.parallel, model, start.log_dir / name, tokenizer, start.cfg.model.peft, source,
                  dtype=export_dtype(start.cfg.model, source))
    if start.parallel.is_rank_zero:
        mark_finished(start.log_dir, step, hf_dir)
    return hf_dir


def hf_every_checkpoint(start: RunStart, run, tokenizer):
    """exp_manager.checkpoint_callback_params.save_hf_every_checkpoint: after_save(step, checkpoint) writing
    `<checkpoint>/hf` (pruned with its checkpoint; LoRA: the adapter folder, never merged mid-run); else None."""
    if not start.cfg.exp_manager.checkpoint_callback_params.save_hf_every_checkpoint:
        return None

    def after_save(step: int, checkpoint: Path) -> None:
        export_hf(start.parallel, run.model, Path(checkpoint) / "hf", tokenizer or start.tokenizer,
                  start.cfg.model.peft, start.restore, dtype=export_dtype(start.cfg.model, start.restore), final=False)
        log.info("step %d: hf export %s", step, Path(checkpoint) / "hf")

    return after_save


def export_dtype(model_cfg, restore) -> str:
    """model.export_dtype, else the checkpoint's own dtype (config.json's torch_dtype / dtype), else fp32."""
    if model_cfg.export_dtype is not None:
        return model_cfg.export_dtype
    if restore:
        saved = checkpoint_dtype(restore)
        if saved is not None:
            return saved
    return "fp32"


def stopped(start: RunStart, result: dict) -> dict:
    where = (f"checkpoint {result['checkpoint']}" if result["checkpoint"] else
             "no checkpoint (exp_manager.create_checkpoint_callback=false): the steps taken are lost")
    log.info("stopped by %s after step %d: %s, nothing exported. Rerun the same command to continue (exit code %d)",
             result["stopped"], result["steps"], where, EXIT_STOPPED)
    release_lock(start.log_dir)
    return result


def nothing_to_do(start: RunStart) -> dict:
    step, log_dir = start.resume.step, start.log_dir
    log.info("nothing to do: %s holds this run, finished at step %d and exported to %s. To train longer raise "
             "max_steps or max_epochs (trainer.*); to start over set exp_manager.resume_if_exists=false (the old run "
             "is moved aside) or use another exp_manager.explicit_log_dir", log_dir, step, log_dir / "hf")
    release_lock(log_dir)
    return {"steps": step, "nothing_to_do": True, "stopped": None, "resumed": True, "log_dir": str(log_dir),
            "hf_dir": str(log_dir / "hf"), "train": {}, "val": {}, "initial_val": {}, "test": {}, "history": [],
            "time": 0.0}


def summary(result: dict, headline: tuple[str, ...], log_dir: Path) -> str:
    def fmt(metrics, prefix=""):
        return ", ".join(f"{k} {metrics[prefix + k]:.4f}" for k in headline if prefix + k in metrics) or "-"

    lines = [f"done: {result['steps']} steps in {result['time']:.1f}s",
             f"  train (last step): {fmt(result['train'])}, tokens/s {result['train'].get('tokens_per_sec', 0):.0f}"]
    if result["initial_val"]:
        lines.append(f"  val before training: {fmt(result['initial_val'])}")
    val_rows = [r for r in result["history"] if "val/loss" in r]
    if len(val_rows) > 1:
        lines.append(f"  val, first check:    {fmt(val_rows[0], 'val/')}")
    if result["val"]:
        lines.append(f"  val at the end:      {fmt(result['val'])}")
    if result.get("test"):
        lines.append(f"  test:                {fmt(result['test'])}")
    lines.append(f"  outputs: {log_dir}/metrics.jsonl, tensorboard/, checkpoints/, {'hf/, ' if result['hf_dir'] else ''}"
                 "curves.png")
    return "\n".join(lines)


def log_reports(layouts: dict) -> None:
    for name, layout in layouts.items():
        if layout is not None:
            log.info(layout.dataset.report.summary(name))


# ------------------------------------------------------------------------------------- entry scripts
def main_entry(raw, schema, run, demo=None) -> None:
    """An entry script's whole @hydra.main function: `main_entry(raw, DPORunConfig, run_dpo, demo=<preset>)`.

    The demo preset applies when the run names no checkpoint and no data (config.presets); the config is
    validated against `schema`; `run(cfg)` runs. A user error (config, data, paths, checkpoints, options, a
    missing optional extra: ValueError / OSError / ImportError) prints one message on stderr and exits
    EXIT_USER_ERROR (1) without a traceback (NEMO_ALIGNER_TRACEBACK=1 shows it); a run stopped by a signal or
    trainer.max_time exits EXIT_STOPPED (75)."""
    setup_logging()
    with user_errors_exit():
        if demo is not None and is_demo_run(raw):
            raw = with_preset(raw, demo, hydra_overrides())
            log.info("no pretrained_checkpoint.restore_from_path and no model.data.data_prefix: running the bundled "
                     "demo (%s: a tiny model trained from scratch on toy data; its values apply to the demo only)",
                     demo)
        result = run(load_config(raw, schema))
    if isinstance(result, dict) and result.get("stopped"):
        sys.exit(EXIT_STOPPED)


@contextlib.contextmanager
def user_errors_exit():
    """Inside the block, a user error (ValueError / OSError / ImportError: config, data, paths, checkpoints,
    options, a missing extra) prints one message on stderr and exits EXIT_USER_ERROR, without a traceback
    unless NEMO_ALIGNER_TRACEBACK=1.
    For any script: `with user_errors_exit(): ...`."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"{rank}{'config error' if isinstance(err, ConfigError) else 'error'}: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def hydra_overrides() -> list[str]:
    """The command line's overrides (`key=value`, `++key=value`, ...) of the running Hydra app ([] outside one)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


# ------------------------------------------------------------------------------- checks before work
def check_inputs(cfg) -> None:
    """What can be checked before anything is read: checkpoint and adapter folders (config.json, readable
    safetensors headers), the tokenizer path, every data file of every split, optional packages."""
    restore = cfg.pretrained_checkpoint.restore_from_path
    if restore:
        check_pretrained_folder(restore, "pretrained_checkpoint.restore_from_path")
    peft = cfg.model.peft
    if peft.peft_scheme == "lora" and peft.restore_from_path:
        check_folder(peft.restore_from_path, "model.peft.restore_from_path", "a PEFT adapter folder")
    if cfg.model.tokenizer.path and not Path(cfg.model.tokenizer.path).exists():
        raise ValueError(f"model.tokenizer.path={cfg.model.tokenizer.path}: not found")
    if cfg.model.data.data_prefix is None or not split_files(cfg.model.data.data_prefix, "train"):
        raise ValueError("model.data.data_prefix.train: no training data given; set \"model.data.data_prefix={train: "
                         "[train.jsonl], validation: [val.jsonl]}\" (the bundled demo runs when neither a checkpoint "
                         "nor data is given, or with +demo=gpt_dpo / +demo=gpt_sft)")
    check_data_files(cfg.model.data.data_prefix)
    if cfg.exp_manager.create_wandb_logger and importlib.util.find_spec("wandb") is None:
        raise ValueError("exp_manager.create_wandb_logger=true needs Weights & Biases: `pip install wandb` (or "
                         "`pip install nemo_aligner[wandb]`), or set exp_manager.create_wandb_logger=false")


def check_folder(path, key: str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{key}={path}: not found; expected {what}")
    if not path.is_dir():
        raise ValueError(f"{key}={path}: is a file; expected {what}")
    return path


def check_pretrained_folder(path, key: str) -> None:
    """A Hugging Face model folder whose config.json we read and whose weight files open as safetensors."""
    path = check_folder(path, key, "a Hugging Face model folder (config.json + *.safetensors)")
    try:
        config_from_pretrained(path)
        check_weight_files(path)
    except (ValueError, OSError) as err:
        raise ValueError(f"{key}={path}: {err}") from None


def open_log_dir(exp, parallel) -> Path:
    """The log dir, created, writable and locked for this run (training.run_dir), on every rank or none."""
    log_dir = log_dir_from(exp)
    key = "exp_manager.explicit_log_dir" if exp.explicit_log_dir else "exp_manager.exp_dir"
    error = None
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(log_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
        if parallel.is_rank_zero:
            acquire_lock(log_dir)
    except ValueError as err:
        error = err
    except OSError as err:
        error = ValueError(f"{key}={log_dir}: cannot write there ({err.strerror or err}); give a folder this user "
                           "can write")
    if not all_ranks_ok(error is None):
        raise error or ValueError(f"{log_dir}: another rank could not open the log dir (see its message)")
    return log_dir


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (the same branch everywhere around collectives)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def cap_seq_length(cfg, restore) -> None:
    """model.encoder_seq_length (4096 by default) capped at the model's max_position_embeddings, logged; an
    explicit model.data.seq_length and packed files (whose sequences are already cut) are left alone."""
    model, data = cfg.model, cfg.model.data
    if data.seq_length is not None or data.data_impl == "packed_jsonl":
        return
    limit = config_from_pretrained(restore)[0].max_position_embeddings if restore else model.max_position_embeddings
    if model.encoder_seq_length > limit:
        log.info("sequence length: model.encoder_seq_length=%d capped at the model's max_position_embeddings=%d "
                 "(model.data.seq_length sets another)", model.encoder_seq_length, limit)
        data.seq_length = limit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def loop_config(cfg):
    """trainer.<algorithm>: the one LoopConfig section of the run's trainer config."""
    loops = [value for f in dataclasses.fields(cfg.trainer)
             if isinstance(value := getattr(cfg.trainer, f.name), LoopConfig)]
    assert len(loops) == 1, f"a run's trainer config has one loop section, found {len(loops)}"
    return loops[0]


def training_plan(cfg, loop_cfg, train_layout, dp_size: int, algorithm=None) -> TrainingPlan:
    """algorithm.items_per_step (optional): items drawn per step when global_batch_size counts something else
    (an online algorithm's completions)."""
    return TrainingPlan.from_config(loop_cfg, num_items=len(train_layout.items),
                                    global_batch_size=cfg.model.global_batch_size,
                                    micro_batch_size=cfg.model.micro_batch_size, dp_size=dp_size,
                                    seed=cfg.model.seed, shuffle=cfg.model.data.shuffle,
                                    items_per_step=getattr(algorithm, "items_per_step", None))


def check_optimisation(cfg, plan: TrainingPlan) -> None:
    """model.optim and model.optim.sched checked (ValueError naming the key), and a schedule whose phases do not
    fit the run shown with its lr curve, before any expensive work."""
    optim, sched = cfg.model.optim, cfg.model.optim.sched
    check_optimizer_settings(name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                             eps=optim.eps)
    settings = dict(base_lr=optim.lr, name=sched.name, max_steps=sched.max_steps or plan.max_steps,
                    warmup_steps=sched.warmup_steps, constant_steps=sched.constant_steps, min_lr=sched.min_lr)
    check_schedule(**settings)
    if text := schedule_warning(**settings):
        log.warning(text)


def flat_config(cfg) -> dict:
    """The run config as {"model.optim.lr": 9e-06, ...}: stored with checkpoints, diffed on resume."""
    return flatten(dataclasses.asdict(cfg))


def run_identity(start: RunStart, model, algorithm, train_layout) -> dict:
    """What defines a run, stored with every checkpoint and compared on resume (training.run_dir): the model's
    weights (content, not path), the architecture (with the adapters' shape), the training data (content),
    tokenisation, and the loss (the algorithm's settings). `sources` says where they came from, for messages."""
    cfg, peft = start.cfg, start.cfg.model.peft
    lora = peft.peft_scheme == "lora"
    adapters = {"peft_scheme": peft.peft_scheme}
    if lora and not peft.restore_from_path:
        adapters.update({k: getattr(peft.lora_tuning, k) for k in ADAPTER_SHAPE})
    settings = getattr(algorithm, "settings", None)
    loss = ({k: v for k, v in dataclasses.asdict(settings).items() if k not in NOT_LOSS}
            if dataclasses.is_dataclass(settings) else {})
    template = getattr(start.tokenizer, "chat_template", None)
    data_keys = {k: v for k, v in dataclasses.asdict(cfg.model.data).items() if k not in NOT_TOKENISATION}
    files = [str(f) for f in train_layout.dataset.report.files]  # the digest below also covers blend weights
    return {
        "model": {"weights": folder_fingerprint(start.restore) if start.restore else "built from model.*",
                  "adapters": folder_fingerprint(peft.restore_from_path) if lora and peft.restore_from_path else None},
        "architecture": {**{k: v for k, v in model.config.to_dict().items() if k not in NOT_ARCHITECTURE},
                         "adapters": adapters},
        "data": {"train": files_digest(train_layout.dataset.report.files)},
        "tokenisation": {"tokenizer": start.tokenizer.fingerprint(), "seq_length": cfg.model.seq_length,
                         "chat_template": hashlib.sha256(template.encode()).hexdigest() if template else None,
                         **data_keys},
        "loss": {"algorithm": type(algorithm).__name__, **loss},
        "sources": {"checkpoint": start.restore, "adapters": peft.restore_from_path, "train": files},
    }


# ------------------------------------------------------------------------------------------ pieces
def setup_logging():
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[nemo_aligner] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def log_dir_from(exp) -> Path:
    if exp.explicit_log_dir:
        return Path(exp.explicit_log_dir)
    if exp.exp_dir:
        return Path(exp.exp_dir) / exp.name
    raise ValueError("exp_manager.explicit_log_dir and exp_manager.exp_dir are both null; set one")


def load_tokenizer(model_cfg, restore_from_path) -> Tokenizer:
    """model.tokenizer.path, else the checkpoint's folder, else (a from-scratch model) the demo tokenizer."""
    path = model_cfg.tokenizer.path or restore_from_path
    if path is None:
        if not DEMO_TOKENIZER.is_dir():
            raise ValueError("no tokenizer: set model.tokenizer.path (or pretrained_checkpoint.restore_from_path "
                             "to a Hugging Face folder that has one)")
        log.info("model.tokenizer.path is null and there is no checkpoint: using the demo tokenizer %s",
                 DEMO_TOKENIZER)
        path = DEMO_TOKENIZER
    return Tokenizer.from_path(path, model_cfg.tokenizer.type)


def gpt_config_from_model(model_cfg, vocab_size: int) -> GPTConfig:
    """The architecture part of `model.*`, for runs that build a model from scratch (every GPTConfig field
    is a model.* key of the same name or in DERIVED_GPT_FIELDS)."""
    arch = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(GPTConfig)
            if f.name not in DERIVED_GPT_FIELDS}
    arch["vocab_size"] = model_cfg.vocab_size or vocab_size
    arch["activations_checkpointing"] = model_cfg.activations_checkpoint_granularity is not None
    return GPTConfig(**arch)


def build_model(model_cfg, restore_from_path, tokenizer, device, prune=None, task: str = CAUSAL_LM) -> GPTModel:
    """prune(model) -> model: with a checkpoint, applied before its weights are read (pipeline stages read
    only their own layers)."""
    if restore_from_path:
        model = load_pretrained(restore_from_path, dtype="fp32", device=device, prune=prune, task=task,
                                seed=model_cfg.seed)
        model.config.activations_checkpointing = model_cfg.activations_checkpoint_granularity is not None
    else:
        # built whole on every rank (the run prunes it to the pipeline stage), so LoRA's random init consumes
        # the RNG as in one process
        torch.manual_seed(model_cfg.seed)
        model = model_class(task)(gpt_config_from_model(model_cfg, tokenizer.vocab_size)).to(device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}; use the checkpoint's tokenizer (model.tokenizer.path)")
    if (model.config.position_embedding_type == "learned_absolute"
            and model_cfg.seq_length > model.config.max_position_embeddings):
        raise ValueError(f"model.data.seq_length / model.encoder_seq_length={model_cfg.seq_length} exceeds the "
                         f"model's max_position_embeddings={model.config.max_position_embeddings}")
    if model_cfg.compile:  # lazy: compiles at the first forward, so later parallel wrapping is seen too
        compile_blocks(model)
    return model


def pick_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator!r} but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device):
    """bf16/fp16 mixed precision: parameters stay fp32 (master weights), matmuls run in low precision."""
    if precision in ("bf16", "bf16-mixed"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision in ("16", "16-mixed"):
        raise ValueError(f"trainer.precision={precision!r} (fp16) is not supported: it needs loss scaling; "
                         "use bf16-mixed or 32")
    return contextlib.nullcontext()
