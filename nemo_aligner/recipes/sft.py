"""The SFT recipe: config -> tokenizer, data (optionally packed online), model, optimiser, loop -> outputs.

`run_sft(cfg)` is what examples/nlp/gpt/train_gpt_sft.py calls; tests call it directly.
Outputs in the log dir, as for DPO: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png.
The exported tokenizer carries the chat template the data was rendered with, so a DPO run started
from `<log_dir>/hf` formats its prompts the same way.
"""

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from nemo_aligner.algorithms.sft import SFTAlgorithm, SFTSettings
from nemo_aligner.config.sft_schema import SFTRunConfig
from nemo_aligner.data.sft import SFTDataset, SFTKeys, SFTTokenizeSettings
from nemo_aligner.data.sft_collate import pack_dataset
from nemo_aligner.models.hf.peft import export_hf, setup_peft
from nemo_aligner.recipes.common import (
    build_model, log_reports, setup_logging, start_run,
)
from nemo_aligner.recipes.dpo import data_files
from nemo_aligner.training.checkpoint import Checkpointer
from nemo_aligner.training.logging import MetricsLogger, ProgressBar
from nemo_aligner.training.loop import Trainer
from nemo_aligner.training.optim import build_optimizer, build_scheduler

log = logging.getLogger("nemo_aligner")


@dataclass
class SFTData:
    dataset: SFTDataset
    items: list  # example indices (padded) or packs of example indices (packed)
    packed: bool = False


def load_sft_datasets(cfg: SFTRunConfig, tokenizer):
    data = cfg.model.data
    settings = SFTTokenizeSettings(seq_length=cfg.model.seq_length, overlength=data.overlength,
                                   chat_template=data.chat_template, loss_on=data.loss_on, add_bos=data.add_bos,
                                   add_eos=data.add_eos)
    keys = SFTKeys(row_format=data.row_format, system_key=data.system_key, prompt_key=data.prompt_key,
                   query_key=data.query_key, response_key=data.response_key)
    train = SFTDataset.from_files(data_files(data.data_prefix, "train"), tokenizer, settings, keys,
                                  name="model.data.data_prefix.train")
    val_files = data_files(data.data_prefix, "validation")
    val = (SFTDataset.from_files(val_files, tokenizer, settings, keys, name="model.data.data_prefix.validation")
           if val_files else None)
    return train, val


def layout(cfg: SFTRunConfig, dataset: SFTDataset | None, name: str) -> SFTData | None:
    """Padded (one example per item) or, with model.data.packing, online packs (one pack per item)."""
    if dataset is None:
        return None
    data = cfg.model.data
    if not data.packing:
        return SFTData(dataset, list(range(len(dataset))))
    pack_size = data.pack_size or cfg.model.seq_length
    packs = pack_dataset(dataset, pack_size, data.packing_algorithm, seed=cfg.model.seed, name=name)
    return SFTData(dataset, packs, packed=True)


def check_single_process(cfg: SFTRunConfig):
    """SFT runs in one process for now; say so rather than silently ignore parallel settings."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    sizes = {"model.tensor_model_parallel_size": cfg.model.tensor_model_parallel_size,
             "model.pipeline_model_parallel_size": cfg.model.pipeline_model_parallel_size, "WORLD_SIZE": world}
    parallel = {k: v for k, v in sizes.items() if v > 1}
    if parallel:
        raise ValueError(f"run_sft is single-process for now, but {parallel}; use one process with "
                         "tensor/pipeline parallel sizes 1")


def run_sft(cfg: SFTRunConfig) -> dict:
    setup_logging()
    check_single_process(cfg)
    start = start_run(cfg)
    restore, log_dir, device, autocast, tokenizer = (start.restore, start.log_dir, start.device, start.autocast,
                                                     start.tokenizer)
    train_ds, val_ds = load_sft_datasets(cfg, tokenizer)
    log_reports({"train": train_ds, "validation": val_ds})
    train, val = layout(cfg, train_ds, "train"), layout(cfg, val_ds, "validation")
    model = build_model(cfg.model, restore, tokenizer, device)
    setup_peft(model, cfg.model.peft)  # model.peft.peft_scheme=lora: adapters added, base frozen
    log.info("model: %s parameters, %s", f"{model.num_parameters():,}",
             f"from {restore}" if restore else "built from model.* (no checkpoint)")
    algorithm = SFTAlgorithm(model, SFTSettings.from_config(cfg.model.sft), tokenizer.pad_id, autocast=autocast)
    trainer = build_trainer(cfg, model, algorithm, train, val, log_dir, device)
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
    unit = "packs" if train.packed else "sequences"
    log.info("training: %d steps (%d per epoch), global batch %d %s, micro batch %d, loss per %s, log dir %s",
             trainer.max_steps, trainer.sampler.steps_per_epoch, cfg.model.global_batch_size, unit,
             cfg.model.micro_batch_size, algorithm.unit[:-1], log_dir)
    result = trainer.fit()
    trainer.progress.close()
    trainer.logger.close()
    if cfg.model.data.chat_template is not None:  # export the template the model was trained with
        tokenizer.chat_template = cfg.model.data.chat_template
    hf_dir = export_hf(model, log_dir / "hf", tokenizer, cfg.model.peft, restore)  # LoRA: PEFT folder or merged
    result.update(log_dir=str(log_dir), hf_dir=str(hf_dir), resumed=bool(resumed), history=trainer.history)
    log.info(summary(result, log_dir))
    return result


def build_trainer(cfg: SFTRunConfig, model, algorithm, train: SFTData, val: SFTData | None, log_dir: Path,
                  device) -> Trainer:
    optim = cfg.model.optim
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=tuple(optim.betas), eps=optim.eps)
    checkpointer = None
    if cfg.exp_manager.create_checkpoint_callback:
        params = cfg.exp_manager.checkpoint_callback_params
        checkpointer = Checkpointer(log_dir / "checkpoints", params.save_top_k, params.monitor, params.mode)
    report = train.dataset.report
    data_metrics = {"data/truncated_examples": report.num_truncated, "data/dropped_examples": report.num_dropped}
    if train.packed:
        data_metrics["data/examples_per_pack"] = len(train.dataset) / len(train.items)
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=None, train_data=train,
                      val_data=val, loop=cfg.trainer.sft, global_batch_size=cfg.model.global_batch_size,
                      micro_batch_size=cfg.model.micro_batch_size, seed=cfg.model.seed, logger=None,
                      checkpointer=checkpointer, monitor=cfg.exp_manager.checkpoint_callback_params.monitor,
                      device=device, data_metrics=data_metrics, shuffle=cfg.model.data.shuffle)
    sched = optim.sched
    trainer.scheduler = build_scheduler(optimizer, name=sched.name, max_steps=sched.max_steps or trainer.max_steps,
                                        warmup_steps=sched.warmup_steps, constant_steps=sched.constant_steps,
                                        min_lr=sched.min_lr)
    return trainer


def summary(result: dict, log_dir: Path) -> str:
    def fmt(metrics, keys=("loss", "token_acc")):
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics) or "-"

    lines = [f"done: {result['steps']} steps in {result['time']:.1f}s",
             f"  train: {fmt(result['train'])}, tokens/s {result['train'].get('tokens_per_sec', 0):.0f}"]
    if result["initial_val"]:
        lines.append(f"  val before training: {fmt(result['initial_val'])}")
    if result["val"]:
        lines.append(f"  val at the end:      {fmt(result['val'])}")
    lines.append(f"  outputs: {log_dir}/metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png")
    return "\n".join(lines)


__all__ = ["run_sft", "SFTData", "load_sft_datasets", "layout"]
