"""What every training recipe shares, in two halves around the recipe's own part (its data and its
algorithm):

    start = start_run(cfg)                     # logging, launch + layout, log dir, device, precision, tokenizer
    model = build_policy(start)                # this rank's model (pipeline stage), LoRA applied
    ... the recipe: data layouts, algorithm
    run = build_run(start, model, algorithm, layouts)   # the one run object, the model ending in the algorithm's head
    return train(start, run, algorithm, ...)   # optimiser, schedule, checkpoints, logger, resume, fit, export

One process or many, the same calls: the parallel layout lives in `start.parallel` and the run object.
"""

import contextlib
import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nemo_aligner.config.nemo_compat import log_ignored_keys
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.models.compile import compile_blocks
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf import load_pretrained
from nemo_aligner.models.hf.peft import setup_peft
from nemo_aligner.parallel.export import export_hf
from nemo_aligner.parallel.mesh import Parallel, init_parallel
from nemo_aligner.parallel.run import ParallelRun, stage_pruner
from nemo_aligner.training.checkpoint import Checkpointer
from nemo_aligner.training.logging import MetricsLogger, ProgressBar
from nemo_aligner.training.loop import Trainer, TrainingPlan
from nemo_aligner.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("nemo_aligner")
DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "demo" / "tokenizer"
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


def start_run(cfg) -> RunStart:
    """Logging, the launch and its parallel layout (validated before anything expensive), the output
    folder, device, precision context and tokenizer."""
    setup_logging()
    parallel = init_parallel(cfg.trainer, cfg.model)  # joins the process group when launched with several
    if not parallel.is_rank_zero:
        log.setLevel(logging.WARNING)
    log_ignored_keys(cfg)
    restore = cfg.pretrained_checkpoint.restore_from_path
    log_dir = log_dir_from(cfg.exp_manager)
    log_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.accelerator)
    return RunStart(cfg, parallel, restore, log_dir, device, autocast_for(cfg.trainer.precision, device),
                    load_tokenizer(cfg.model, restore))


def build_policy(start: RunStart) -> GPTModel:
    """This rank's model: read from the checkpoint (a pipeline stage reads only its own layers) or built
    from model.*; LoRA adapters added when model.peft.peft_scheme=lora."""
    model_cfg = start.cfg.model
    model = build_model(model_cfg, start.restore, start.tokenizer, start.device, prune=stage_pruner(start.parallel))
    setup_peft(model, model_cfg.peft)  # model.peft.peft_scheme=lora: adapters added, base frozen
    start.parallel.dims.check_model(model.config)
    log.info("model: %s parameters%s, %s", f"{model.num_parameters():,}",
             " (this pipeline stage)" if start.parallel.dims.pp > 1 else "",
             f"from {start.restore}" if start.restore else "built from model.* (no checkpoint)")
    return model


def build_run(start: RunStart, model, algorithm, layouts) -> ParallelRun:
    """The run object for `model` ending in `algorithm.head()`; `layouts` (None for a missing split) fix the
    longest row a pipeline stage exchanges."""
    max_rows = max(layout.max_row_tokens() for layout in layouts if layout is not None)
    return ParallelRun(start.parallel, model, algorithm.head(), autocast=start.autocast, max_row_tokens=max_rows)


def data_metrics(layout) -> dict:
    """What every step logs about the training data: truncated / dropped rows, examples per pack."""
    out = layout.dataset.report.metrics()
    if layout.packed:
        out[f"data/{layout.dataset.unit}_per_pack"] = layout.examples_per_item()
    return out


def train(start: RunStart, run, algorithm, train_data, val_data, loop_cfg, tokenizer=None) -> dict:
    """Optimiser, schedule, checkpoints, logger and progress; resume; fit; Hugging Face export; summary.
    loop_cfg: trainer.<algorithm>; tokenizer: what hf/ carries (default the run's)."""
    cfg, model, log_dir = start.cfg, run.model, start.log_dir
    exp, optim = cfg.exp_manager, cfg.model.optim
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=tuple(optim.betas), eps=optim.eps)
    plan = TrainingPlan.from_config(loop_cfg, num_items=len(train_data.items),
                                    global_batch_size=cfg.model.global_batch_size,
                                    micro_batch_size=cfg.model.micro_batch_size, dp_size=run.dp.size,
                                    seed=cfg.model.seed, shuffle=cfg.model.data.shuffle)
    sched = optim.sched
    scheduler = build_scheduler(optimizer, name=sched.name, max_steps=sched.max_steps or plan.max_steps,
                                warmup_steps=sched.warmup_steps, constant_steps=sched.constant_steps,
                                min_lr=sched.min_lr)
    params = exp.checkpoint_callback_params
    checkpointer = (Checkpointer(log_dir / "checkpoints", params.save_top_k, params.monitor, params.mode,
                                 topology=run.topology()) if exp.create_checkpoint_callback else None)
    resume_from = checkpointer.latest() if checkpointer is not None and exp.resume_if_exists else None
    if exp.resume_if_exists and resume_from is None and not exp.resume_ignore_no_checkpoint:
        raise ValueError(f"exp_manager.resume_if_exists=true and resume_ignore_no_checkpoint=false, but "
                         f"{log_dir / 'checkpoints'} holds no complete checkpoint")
    start_step = Checkpointer.step_of(resume_from) if resume_from is not None else 0
    is_rank_zero = start.parallel.is_rank_zero
    logger = MetricsLogger(log_dir, tensorboard=exp.create_tensorboard_logger, wandb=exp.create_wandb_logger,
                           wandb_kwargs=dataclasses.asdict(exp.wandb_logger_kwargs), run_config=dataclasses.asdict(cfg),
                           resume_step=start_step, is_rank_zero=is_rank_zero)
    progress = ProgressBar(total=plan.max_steps, initial=start_step, enabled=exp.progress_bar and is_rank_zero)
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=scheduler, run=run,
                      train_data=train_data, val_data=val_data, loop=loop_cfg, plan=plan, logger=logger,
                      progress=progress, checkpointer=checkpointer, monitor=params.monitor,
                      data_metrics=data_metrics(train_data))
    if resume_from is not None:
        trainer.resume(resume_from)
    log.info("training: %d steps (%d per epoch), global batch %d %s, micro batch %d, loss per %s, log dir %s",
             plan.max_steps, plan.sampler.steps_per_epoch, cfg.model.global_batch_size,
             "packs" if train_data.packed else train_data.dataset.unit, cfg.model.micro_batch_size,
             algorithm.unit.rstrip("s"), log_dir)
    result = trainer.fit()
    progress.close()
    logger.close()
    hf_dir = final_export(start, model, tokenizer, resume_from, result["steps"] - start_step)
    result.update(log_dir=str(log_dir), hf_dir=str(hf_dir) if hf_dir else None, resumed=resume_from is not None,
                  history=trainer.history)
    log.info(summary(result, algorithm.headline_metrics, log_dir))
    return result


def final_export(start: RunStart, model, tokenizer, resumed_from, steps_trained: int) -> Path | None:
    """The final hf/ export (LoRA: a PEFT adapter folder, or merged), unless the user turned it off
    (exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false) or it would rewrite the same
    weights: a resumed run that trained no step, whose hf/ was written after the checkpoint it resumed."""
    cfg, hf_dir = start.cfg, start.log_dir / "hf"
    if not cfg.exp_manager.checkpoint_callback_params.save_nemo_on_train_end:
        log.info("no hf/ export: exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false")
        return None
    if steps_trained == 0 and resumed_from is not None and _written_after(hf_dir / "config.json", resumed_from):
        log.info("hf/ already holds this state (no step since %s): not written again", resumed_from)
        return hf_dir
    return export_hf(start.parallel, model, hf_dir, tokenizer or start.tokenizer, cfg.model.peft, start.restore)


def _written_after(path: Path, other: Path) -> bool:
    """True on every rank when `path` exists and is newer than `other` (all ranks take the same branch)."""
    newer = path.is_file() and path.stat().st_mtime_ns >= Path(other).stat().st_mtime_ns
    flag = torch.tensor([int(newer)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


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
    lines.append(f"  outputs: {log_dir}/metrics.jsonl, tensorboard/, checkpoints/, {'hf/, ' if result['hf_dir'] else ''}"
                 "curves.png")
    return "\n".join(lines)


def log_reports(layouts: dict) -> None:
    for name, layout in layouts.items():
        if layout is not None:
            log.info(layout.dataset.report.summary(name))


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


def build_model(model_cfg, restore_from_path, tokenizer, device, prune=None) -> GPTModel:
    """prune(model) -> model: with a checkpoint, applied before its weights are read (pipeline stages read
    only their own layers)."""
    if restore_from_path:
        model = load_pretrained(restore_from_path, dtype="fp32", device=device, prune=prune)
        model.config.activations_checkpointing = model_cfg.activations_checkpoint_granularity is not None
    else:
        # built whole on every rank (the run prunes it to the pipeline stage), so LoRA's random init consumes
        # the RNG as in one process
        torch.manual_seed(model_cfg.seed)
        model = GPTModel(gpt_config_from_model(model_cfg, tokenizer.vocab_size)).to(device)
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
