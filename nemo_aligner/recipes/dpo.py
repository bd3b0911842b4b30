"""The DPO recipe: config -> tokenizer, data, model, reference, optimiser, loop -> outputs.

`run_dpo(cfg)` is what examples/nlp/gpt/train_gpt_dpo.py calls; tests call it directly.
Outputs in the log dir: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png.
"""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file, save_file

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings, OnlineReference, precompute_reference
from nemo_aligner.config.schema import DPORunConfig
from nemo_aligner.data.datasets import PreferenceDataset
from nemo_aligner.data.formats import KeyMap
from nemo_aligner.data.tokenize import TokenizeSettings
from nemo_aligner.models.hf import save_pretrained
from nemo_aligner.recipes.common import (
    autocast_for, build_model, cache_key, load_tokenizer, log_dir_from, model_identity, pick_device, setup_logging,
)
from nemo_aligner.training.checkpoint import Checkpointer
from nemo_aligner.training.logging import MetricsLogger, ProgressBar
from nemo_aligner.training.loop import Trainer
from nemo_aligner.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("nemo_aligner")


@dataclass
class TrainData:
    dataset: PreferenceDataset
    items: list  # pair indices (padded) or packs of pair indices (packed)
    packed: bool = False


def data_files(data_prefix, split: str) -> list[str]:
    """model.data.data_prefix as NeMo writes it: {train: [...], validation: [...], test: [...]}."""
    if not isinstance(data_prefix, dict):
        raise ValueError("model.data.data_prefix must be a mapping like {train: [file], validation: [file]}; "
                         f"got {data_prefix!r}")
    files = data_prefix.get(split)
    if files is None:
        return []
    files = [files] if isinstance(files, str) else list(files)
    for f in files:
        if not isinstance(f, str):
            raise ValueError(f"model.data.data_prefix.{split}: expected file paths, got {f!r} "
                             "(blending weights are not supported; list the files)")
    return files


def load_datasets(cfg: DPORunConfig, tokenizer):
    data = cfg.model.data
    settings = TokenizeSettings(seq_length=cfg.model.seq_length, overlength=data.overlength,
                                chat_template=data.chat_template, add_bos=data.add_bos, add_eos=data.add_eos)
    keys = KeyMap(prompt=data.prompt_key, chosen=data.chosen_key, rejected=data.rejected_key, input=data.input_key)
    rewards = (data.default_chosen_reward, data.default_rejected_reward)
    train = PreferenceDataset.from_files(data_files(data.data_prefix, "train"), tokenizer, settings, keys, rewards,
                                         name="model.data.data_prefix.train")
    val_files = data_files(data.data_prefix, "validation")
    val = (PreferenceDataset.from_files(val_files, tokenizer, settings, keys, rewards,
                                        name="model.data.data_prefix.validation") if val_files else None)
    return train, val


def prepare_reference(cfg, model, settings, datasets, autocast, log_dir, restore, pad_id):
    """Precomputed (cached) log-probs or a frozen copy; None when the loss needs no reference."""
    if not settings.needs_reference:
        log.info("loss %s is reference-free: no reference pass", settings.loss_types)
        return None
    if cfg.model.dpo.ref_mode == "online":
        return OnlineReference(model)
    cache_dir = Path(cfg.model.dpo.ref_cache_dir or log_dir / "ref_logps")
    micro = cfg.model.dpo.log_prob_forward_micro_batch_size or cfg.model.micro_batch_size
    for name, data in datasets.items():
        if data is None:
            continue
        key = cache_key(model_identity(model, cfg.model, restore), data.dataset.fingerprint, cfg.trainer.precision,
                        data.packed)
        path = cache_dir / f"{name}-{key}.safetensors"
        if path.is_file():
            cached = load_file(path)
            data.dataset.ref_chosen, data.dataset.ref_rejected = cached["chosen"], cached["rejected"]
            log.info("reference log-probs for %s: loaded from %s", name, path)
            continue
        items = data.items
        batches = [items[i:i + micro] for i in range(0, len(items), micro)]
        precompute_reference(model, data.dataset, batches, pad_id, settings.chunk_size, autocast,
                             packed=data.packed)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"chosen": data.dataset.ref_chosen, "rejected": data.dataset.ref_rejected}, tmp)
        tmp.replace(path)
        log.info("reference log-probs for %s: computed for %d pairs, cached in %s", name, len(data.dataset), path)
    return None


def run_dpo(cfg: DPORunConfig) -> dict:
    setup_logging()
    restore = cfg.pretrained_checkpoint.restore_from_path
    log_dir = log_dir_from(cfg.exp_manager)
    log_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.trainer.accelerator)
    autocast = autocast_for(cfg.trainer.precision, device)
    tokenizer = load_tokenizer(cfg.model, restore)
    train_ds, val_ds = load_datasets(cfg, tokenizer)
    for name, ds in (("train", train_ds), ("validation", val_ds)):
        if ds is not None:
            log.info(ds.report.summary(name))
    model = build_model(cfg.model, restore, tokenizer, device)
    log.info("model: %s parameters, %s", f"{model.num_parameters():,}",
             f"from {restore}" if restore else "built from model.* (no checkpoint)")
    settings = DPOSettings.from_config(cfg.model.dpo)
    train = TrainData(train_ds, list(range(len(train_ds))))
    val = TrainData(val_ds, list(range(len(val_ds)))) if val_ds is not None else None
    reference = prepare_reference(cfg, model, settings, {"train": train, "validation": val}, autocast, log_dir,
                                  restore, tokenizer.pad_id)
    algorithm = DPOAlgorithm(model, settings, tokenizer.pad_id, reference=reference, autocast=autocast)
    optim = cfg.model.optim
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=tuple(optim.betas), eps=optim.eps)
    checkpointer = None
    if cfg.exp_manager.create_checkpoint_callback:
        params = cfg.exp_manager.checkpoint_callback_params
        checkpointer = Checkpointer(log_dir / "checkpoints", params.save_top_k, params.monitor, params.mode)
    data_metrics = {"data/truncated_pairs": train_ds.report.num_truncated,
                    "data/dropped_pairs": train_ds.report.num_dropped}
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=None, train_data=train,
                      val_data=val, loop=cfg.trainer.dpo, global_batch_size=cfg.model.global_batch_size,
                      micro_batch_size=cfg.model.micro_batch_size, seed=cfg.model.seed, logger=None,
                      checkpointer=checkpointer, monitor=cfg.exp_manager.checkpoint_callback_params.monitor,
                      device=device, data_metrics=data_metrics, shuffle=cfg.model.data.shuffle)
    sched = optim.sched
    trainer.scheduler = build_scheduler(optimizer, name=sched.name, max_steps=sched.max_steps or trainer.max_steps,
                                        warmup_steps=sched.warmup_steps, constant_steps=sched.constant_steps,
                                        min_lr=sched.min_lr)
    resumed = cfg.exp_manager.resume_if_exists and trainer.resume()
    if not resumed and cfg.exp_manager.resume_if_exists and not cfg.exp_manager.resume_ignore_no_checkpoint:
        raise ValueError(f"exp_manager.resume_if_exists=true and resume_ignore_no_checkpoint=false, but "
                         f"{log_dir / 'checkpoints'} holds no complete checkpoint")
    trainer.logger = MetricsLogger(log_dir, tensorboard=cfg.exp_manager.create_tensorboard_logger,
                                   wandb=cfg.exp_manager.create_wandb_logger,
                                   wandb_kwargs=dataclasses.asdict(cfg.exp_manager.wandb_logger_kwargs),
                                   run_config=dataclasses.asdict(cfg), resume_step=trainer.state.step)
    trainer.progress = ProgressBar(total=trainer.max_steps, initial=trainer.state.step,
                                   enabled=cfg.exp_manager.progress_bar)
    log.info("training: %d steps (%d per epoch), global batch %d pairs, micro batch %d, log dir %s",
             trainer.max_steps, trainer.sampler.steps_per_epoch, cfg.model.global_batch_size,
             cfg.model.micro_batch_size, log_dir)
    result = trainer.fit()
    trainer.progress.close()
    trainer.logger.close()
    hf_dir = save_pretrained(model, log_dir / "hf", tokenizer=tokenizer)
    result.update(log_dir=str(log_dir), hf_dir=str(hf_dir), resumed=bool(resumed), history=trainer.history)
    log.info(summary(result, log_dir))
    return result


def summary(result: dict, log_dir: Path) -> str:
    def fmt(metrics, keys=("loss", "acc")):
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics) or "-"

    lines = [f"done: {result['steps']} steps in {result['time']:.1f}s",
             f"  train: {fmt(result['train'])}, tokens/s {result['train'].get('tokens_per_sec', 0):.0f}"]
    if result["initial_val"]:
        lines.append(f"  val before training: {fmt(result['initial_val'])}")
    if result["val"]:
        lines.append(f"  val at the end:      {fmt(result['val'])}")
    lines.append(f"  outputs: {log_dir}/metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png")
    return "\n".join(lines)


__all__ = ["run_dpo", "TrainData", "load_datasets", "data_files"]
