"""The DPO recipe (and IPO, RPO, SimPO, ORPO, TRL's losses): config -> pairs, model, reference, loop.

`run_dpo(cfg)` is what examples/nlp/gpt/train_gpt_dpo.py calls; tests call it directly. Outputs in
the log dir: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png, ref_logps/ (precomputed
reference log-probs, for the splits the run uses: no validation pass with limit_val_batches=0; the
test split, when given, is evaluated once at the end).
"""

import copy
import logging
from pathlib import Path

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings
from nemo_aligner.algorithms.reference import ModelReference, cached_reference, model_identity
from nemo_aligner.config.dpo import DPORunConfig
from nemo_aligner.data.layout import DataLayout, packed_layout
from nemo_aligner.data.preference.dataset import PreferenceDataset, options_from_config
from nemo_aligner.data.preference.packed_file import load_packed_dataset
from nemo_aligner.models.hf import config_from_pretrained
from nemo_aligner.recipes.skeleton import build_policy, build_run, log_reports, split_layouts, start_run, train, used_splits
from nemo_aligner.training.loop import validation_items

log = logging.getLogger("nemo_aligner")
SPLITS = ("train", "validation", "test")


def shared_prompt_for(cfg: DPORunConfig, start) -> bool:
    """model.data.shared_prompt, where it is exact for the model: LongRoPE picks its frequencies from each
    sequence's length, so a pair whose two sequences fall on both sides of the original context would need
    two versions of the prompt; sharing then needs every sequence within that context."""
    if not cfg.model.data.shared_prompt:
        return False
    arch = config_from_pretrained(start.restore)[0] if start.restore else cfg.model
    original = arch.rope_original_max_position_embeddings
    if arch.rope_scaling == "longrope" and cfg.model.seq_length > original:
        log.info("model.data.shared_prompt: off, LongRoPE with sequences up to %d tokens > its original context of "
                 "%d (a pair could need the prompt at both scales)", cfg.model.seq_length, original)
        return False
    return True


def load_layouts(cfg: DPORunConfig, tokenizer, shared_prompt: bool = False
                 ) -> tuple[DataLayout, DataLayout | None, DataLayout | None]:
    """(train, validation or None, test or None): jsonl/parquet pairs tokenised now (packed now with
    model.data.packing), or packs read from prepare_packed_dpo_dataset.py's files (data_impl=packed_jsonl).
    shared_prompt: each pair laid out as one prefix group (packing then counts the prompt once)."""
    data, model = cfg.model.data, cfg.model
    files = used_splits(cfg, cfg.trainer.dpo)
    if data.data_impl == "packed_jsonl":
        return tuple(_packed(cfg, tokenizer, files[split], split, shared_prompt) for split in SPLITS)
    for split in SPLITS:
        if packed := [f for f in files[split] if f.endswith(".safetensors")]:
            raise ValueError(f"model.data.data_prefix.{split} lists packed files {packed} but "
                             f"model.data.data_impl={data.data_impl}; set model.data.data_impl=packed_jsonl")
    settings, columns, rewards = options_from_config(model)
    return split_layouts(cfg, cfg.trainer.dpo, lambda files, key: PreferenceDataset.from_files(
        files, tokenizer, settings, columns, rewards, name=key, shared_prompt=shared_prompt),
        default_pack_size=2 * model.seq_length)


def _packed(cfg, tokenizer, files, split, shared_prompt):
    if not files and split != "train":
        return None
    data = cfg.model.data
    dataset = load_packed_dataset(files, tokenizer_fingerprint=tokenizer.fingerprint(),
                                  max_pack_size=cfg.model.encoder_seq_length, name=f"model.data.data_prefix.{split}",
                                  default_rewards=(data.default_chosen_reward, data.default_rejected_reward),
                                  vocab_size=tokenizer.vocab_size)
    dataset.shared_prompt = shared_prompt  # the packs hold whole pairs either way; shared ones are shorter
    return packed_layout(dataset, dataset.packs, dataset.pack_size, "packed files", split)


def setup_reference(cfg: DPORunConfig, start, run, algorithm, reference_copy, layouts: dict):
    """A ModelReference run each step (ref_mode online / adapter), or None once the log-probs are in the data
    (precompute) or not needed (reference-free losses)."""
    if not algorithm.settings.needs_reference:
        return None
    if cfg.model.ref_mode == "adapter":  # LoRA: the policy with its adapters off
        return ModelReference(run.policy, frozen_copy=False)
    if cfg.model.ref_mode == "online":
        return ModelReference(run.wrap_frozen(reference_copy, algorithm.head()), frozen_copy=True)
    dpo = cfg.model.dpo
    identity = model_identity(run.model.config.to_dict(), cfg.model.seed, start.restore)
    micro = dpo.log_prob_forward_micro_batch_size or cfg.model.micro_batch_size
    cached_reference(run, layouts, algorithm.make_batch, micro, Path(dpo.ref_cache_dir or start.log_dir / "ref_logps"),
                     identity, cfg.trainer.precision, start.parallel.is_rank_zero)
    return None


def reference_layouts(cfg: DPORunConfig, layouts: dict) -> dict:
    """What a precomputed reference must cover: the training pairs, only the validation items that validation
    will read (none when trainer.dpo.limit_val_batches is 0) and the test split (evaluated whole at the end)."""
    loop, val_data = cfg.trainer.dpo, layouts["validation"]
    out = dict(layouts)
    if val_data is None or loop.limit_val_batches == 0:
        out["validation"] = None
    else:
        used = validation_items(val_data.items, loop.limit_val_batches, cfg.model.global_batch_size)
        out["validation"] = DataLayout(val_data.dataset, used, val_data.packed)
    return out


def run_dpo(cfg: DPORunConfig) -> dict:
    start = start_run(cfg)
    train_data, val_data, test_data = load_layouts(cfg, start.tokenizer, shared_prompt_for(cfg, start))
    layouts = {"train": train_data, "validation": val_data, "test": test_data}
    log_reports(layouts)
    model = build_policy(start)
    algorithm = DPOAlgorithm(DPOSettings.from_config(cfg.model.dpo), start.tokenizer.pad_id)
    if not algorithm.settings.needs_reference:
        log.info("loss %s is reference-free: no reference pass", algorithm.settings.loss_types)
    online = algorithm.settings.needs_reference and cfg.model.ref_mode == "online"
    reference_copy = copy.deepcopy(model) if online else None  # before the policy is sharded
    run = build_run(start, model, algorithm, (train_data, val_data, test_data))
    algorithm.reference = setup_reference(cfg, start, run, algorithm, reference_copy,
                                          reference_layouts(cfg, layouts))
    return train(start, run, algorithm, train_data, val_data, cfg.trainer.dpo, test_data=test_data)
