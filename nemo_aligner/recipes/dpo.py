"""The DPO recipe: config -> tokenizer, data, model, reference, optimiser, loop -> outputs.

`run_dpo(cfg)` is what examples/nlp/gpt/train_gpt_dpo.py calls; tests call it directly.
Outputs in the log dir: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png.
"""

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.numpy import load_file, save_file

from nemo_aligner.algorithms.dpo import (
    AdapterReference, DPOAlgorithm, DPOSettings, OnlineReference, precompute_reference, reference_pair_sums,
)
from nemo_aligner.config.schema import DPORunConfig
from nemo_aligner.data.collate import collate_packed, collate_padded
from nemo_aligner.data.datasets import PreferenceDataset
from nemo_aligner.data.formats import KeyMap
from nemo_aligner.data.packed_file import PackedPreferenceDataset, load_packed_dataset, pack_dataset, pack_summary
from nemo_aligner.data.tokenize import TokenizeSettings
from nemo_aligner.models.hf.peft import export_hf, setup_peft
from nemo_aligner.models.lora import adapters_disabled
from nemo_aligner.parallel.mesh import init_parallel
from nemo_aligner.parallel.run import ParallelRun, all_ranks_have, stage_pruner
from nemo_aligner.recipes.common import (
    build_model, cache_key, log_reports, model_identity, setup_logging, start_run,
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


def data_options(cfg: DPORunConfig) -> tuple[TokenizeSettings, KeyMap, tuple[float, float]]:
    """What turns rows into pairs (model.data.*): tokenisation settings, column names, default rewards."""
    data = cfg.model.data
    settings = TokenizeSettings(seq_length=cfg.model.seq_length, overlength=data.overlength,
                                chat_template=data.chat_template, add_bos=data.add_bos, add_eos=data.add_eos)
    keys = KeyMap(prompt=data.prompt_key, chosen=data.chosen_key, rejected=data.rejected_key, input=data.input_key)
    return settings, keys, (data.default_chosen_reward, data.default_rejected_reward)


def load_datasets(cfg: DPORunConfig, tokenizer):
    """(train, validation or None): rows tokenised now, or packed files (model.data.data_impl=packed_jsonl)."""
    data = cfg.model.data
    if data.data_impl == "packed_jsonl":
        return tuple(_load_packed(cfg, tokenizer, split) for split in ("train", "validation"))
    for split in ("train", "validation"):
        packed_files = [f for f in data_files(data.data_prefix, split) if f.endswith(".safetensors")]
        if packed_files:
            raise ValueError(f"model.data.data_prefix.{split} lists packed files {packed_files} but "
                             f"model.data.data_impl={data.data_impl}; set model.data.data_impl=packed_jsonl")
    settings, keys, rewards = data_options(cfg)
    train = PreferenceDataset.from_files(data_files(data.data_prefix, "train"), tokenizer, settings, keys, rewards,
                                         name="model.data.data_prefix.train")
    val_files = data_files(data.data_prefix, "validation")
    val = (PreferenceDataset.from_files(val_files, tokenizer, settings, keys, rewards,
                                        name="model.data.data_prefix.validation") if val_files else None)
    return train, val


def _load_packed(cfg: DPORunConfig, tokenizer, split: str):
    files = data_files(cfg.model.data.data_prefix, split)
    if not files and split != "train":
        return None
    data = cfg.model.data
    return load_packed_dataset(files, tokenizer_fingerprint=tokenizer.fingerprint(),
                               max_pack_size=cfg.model.encoder_seq_length,
                               default_rewards=(data.default_chosen_reward, data.default_rejected_reward),
                               name=f"model.data.data_prefix.{split}")


def make_train_data(cfg: DPORunConfig, dataset, name: str = "train") -> TrainData | None:
    """The items the loop samples: packs from packed files, packs built now (model.data.packing), or pairs."""
    if dataset is None:
        return None
    data = cfg.model.data
    if isinstance(dataset, PackedPreferenceDataset):
        packs, pack_size, how = dataset.packs, dataset.pack_size, "packed files"
    elif data.packing:
        pack_size = data.pack_size or 2 * cfg.model.seq_length
        packs = pack_dataset(dataset, pack_size, data.packing_algorithm, cfg.model.seed, name=f"{name} data")
        how = f"{data.packing_algorithm}, seed {cfg.model.seed}"
    else:
        return TrainData(dataset, list(range(len(dataset))))
    stats = pack_summary(dataset, packs, pack_size)
    log.info("%s: %d pairs in %d packs of <= %d tokens (%s): %.2f pairs per pack, %.1f%% of pack tokens are real; "
             "micro_batch_size and global_batch_size count packs", name, stats["num_pairs"], stats["num_packs"],
             pack_size, how, stats["avg_pairs_per_pack"], 100 * stats["efficiency"])
    return TrainData(dataset, packs, packed=True)


def resolve_ref_mode(model_cfg) -> str:
    """model.dpo.ref_mode; null means adapter with LoRA (model.peft.peft_scheme=lora), else precompute."""
    return model_cfg.dpo.ref_mode or ("adapter" if model_cfg.peft.peft_scheme == "lora" else "precompute")


def prepare_reference(cfg, model, settings, datasets, autocast, log_dir, restore, pad_id, parallel_run=None):
    """Precomputed (cached) log-probs or a frozen copy; None when the loss needs no reference.

    parallel_run (distributed runs): the reference is its sharded frozen copy, or log-probs computed
    with its parallel policy; only rank 0 writes the cache."""
    if not settings.needs_reference:
        log.info("loss %s is reference-free: no reference pass", settings.loss_types)
        return None
    if resolve_ref_mode(cfg.model) == "adapter":  # LoRA: the policy with its adapters off
        return AdapterReference(parallel_run.policy if parallel_run is not None else model)
    if resolve_ref_mode(cfg.model) == "online":
        if parallel_run is not None:
            return OnlineReference(parallel_run.reference_module, copy_model=False)
        return OnlineReference(model)
    cache_dir = Path(cfg.model.dpo.ref_cache_dir or log_dir / "ref_logps")
    micro = cfg.model.dpo.log_prob_forward_micro_batch_size or cfg.model.micro_batch_size
    for name, data in datasets.items():
        if data is None:
            continue
        key = cache_key(model_identity(model, cfg.model, restore), data.dataset.fingerprint, cfg.trainer.precision,
                        data.packed)
        path = cache_dir / f"{name}-{key}.safetensors"
        if path.is_file() if parallel_run is None else all_ranks_have(path):
            cached = load_file(path)
            data.dataset.ref_chosen, data.dataset.ref_rejected = cached["chosen"], cached["rejected"]
            log.info("reference log-probs for %s: loaded from %s", name, path)
            continue
        items = data.items
        batches = [items[i:i + micro] for i in range(0, len(items), micro)]
        if parallel_run is not None:
            collate = lambda ds, its, packed: (collate_packed if packed else collate_padded)(ds, its, pad_id)  # noqa: E731
            with adapters_disabled(parallel_run.policy):  # with LoRA: the base model's log-probs
                parallel_run.precompute_reference(data, micro, collate, reference_pair_sums)
            if not parallel_run.parallel.is_rank_zero:
                continue
        else:
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
    parallel = init_parallel(cfg.trainer, cfg.model)  # validates the layout; joins the process group if launched
    if not parallel.is_rank_zero:
        log.setLevel(logging.WARNING)
    start = start_run(cfg)
    restore, log_dir, device, autocast, tokenizer = (start.restore, start.log_dir, start.device, start.autocast,
                                                     start.tokenizer)
    train_ds, val_ds = load_datasets(cfg, tokenizer)
    log_reports({"train": train_ds, "validation": val_ds})
    model = build_model(cfg.model, restore, tokenizer, device, prune=stage_pruner(parallel))
    setup_peft(model, cfg.model.peft)  # model.peft.peft_scheme=lora: adapters added, base frozen
    parallel.dims.check_model(model.config)
    log.info("model: %s parameters, %s", f"{model.num_parameters():,}",
             f"from {restore}" if restore else "built from model.* (no checkpoint)")
    settings = DPOSettings.from_config(cfg.model.dpo)
    train, val = make_train_data(cfg, train_ds, "train"), make_train_data(cfg, val_ds, "validation")
    run = None  # distributed: `model` becomes this rank's pipeline stage, tensor- and FSDP-sharded
    if parallel.distributed:
        run = ParallelRun(parallel, model, chunk_size=settings.chunk_size, autocast=autocast, datasets=(train, val),
                          online_reference=settings.needs_reference and resolve_ref_mode(cfg.model) == "online")
    reference = prepare_reference(cfg, model, settings, {"train": train, "validation": val}, autocast, log_dir,
                                  restore, tokenizer.pad_id, parallel_run=run)
    algorithm = DPOAlgorithm(run.policy if run else model, settings, tokenizer.pad_id, reference=reference,
                             autocast=autocast)
    if run is not None:
        run.attach(algorithm)
    optim = cfg.model.optim
    optimizer = build_optimizer(model, name=optim.name, lr=optim.lr, weight_decay=optim.weight_decay,
                                betas=tuple(optim.betas), eps=optim.eps)
    checkpointer = None
    if cfg.exp_manager.create_checkpoint_callback:
        params = cfg.exp_manager.checkpoint_callback_params
        checkpointer = Checkpointer(log_dir / "checkpoints", params.save_top_k, params.monitor, params.mode,
                                    topology=run.topology() if run else None)
    data_metrics = {"data/truncated_pairs": train_ds.report.num_truncated,
                    "data/dropped_pairs": train_ds.report.num_dropped}
    trainer = Trainer(model=model, algorithm=algorithm, optimizer=optimizer, scheduler=None, train_data=train,
                      val_data=val, loop=cfg.trainer.dpo, global_batch_size=cfg.model.global_batch_size,
                      micro_batch_size=cfg.model.micro_batch_size, seed=cfg.model.seed, logger=None,
                      checkpointer=checkpointer, monitor=cfg.exp_manager.checkpoint_callback_params.monitor,
                      device=device, data_metrics=data_metrics, shuffle=cfg.model.data.shuffle,
                      **(run.trainer_kwargs() if run else {}))
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
                                   run_config=dataclasses.asdict(cfg), resume_step=trainer.state.step,
                                   is_rank_zero=parallel.is_rank_zero)
    trainer.progress = ProgressBar(total=trainer.max_steps, initial=trainer.state.step,
                                   enabled=cfg.exp_manager.progress_bar and parallel.is_rank_zero)
    log.info("training: %d steps (%d per epoch), global batch %d %s, micro batch %d, log dir %s",
             trainer.max_steps, trainer.sampler.steps_per_epoch, cfg.model.global_batch_size,
             "packs" if train.packed else "pairs", cfg.model.micro_batch_size, log_dir)
    result = trainer.fit()
    trainer.progress.close()
    trainer.logger.close()
    hf_dir = export_hf(model, log_dir / "hf", tokenizer, cfg.model.peft, restore, parallel_run=run)  # LoRA: PEFT folder
    result.update(log_dir=str(log_dir), hf_dir=str(hf_dir), resumed=bool(resumed), history=trainer.history)
    log.info(summary(result, log_dir))
    return result


def summary(result: dict, log_dir: Path) -> str:
    def fmt(metrics, prefix=""):
        return ", ".join(f"{k} {metrics[prefix + k]:.4f}" for k in ("loss", "acc") if prefix + k in metrics) or "-"

    lines = [f"done: {result['steps']} steps in {result['time']:.1f}s",
             f"  train (last step): {fmt(result['train'])}, tokens/s {result['train'].get('tokens_per_sec', 0):.0f}"]
    if result["initial_val"]:
        lines.append(f"  val before training: loss {result['initial_val']['loss']:.4f} (policy = reference)")
    val_rows = [r for r in result["history"] if "val/loss" in r]
    if len(val_rows) > 1:
        lines.append(f"  val, first check:    {fmt(val_rows[0], 'val/')}")
    if result["val"]:
        lines.append(f"  val at the end:      {fmt(result['val'])}")
    lines.append(f"  outputs: {log_dir}/metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png")
    return "\n".join(lines)


__all__ = ["run_dpo", "TrainData", "load_datasets", "data_files", "data_options", "make_train_data"]
