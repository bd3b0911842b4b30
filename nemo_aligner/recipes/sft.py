"""The SFT recipe: config -> examples (optionally packed online), model, loop -> outputs.

`run_sft(cfg)` is what examples/nlp/gpt/train_gpt_sft.py calls; tests call it directly. Outputs in
the log dir, as for DPO: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png. The exported
tokenizer carries the chat template the data was rendered with, so a DPO run started from
`<log_dir>/hf` formats its prompts the same way.
"""

from nemo_aligner.algorithms.sft import SFTAlgorithm, SFTSettings
from nemo_aligner.config.sft import SFTRunConfig
from nemo_aligner.data.layout import DataLayout
from nemo_aligner.data.sft.dataset import SFTDataset, options_from_config
from nemo_aligner.recipes.skeleton import build_policy, build_run, log_reports, split_layouts, start_run, train


def load_layouts(cfg: SFTRunConfig, tokenizer) -> tuple[DataLayout, DataLayout | None, DataLayout | None]:
    """(train, validation or None, test or None): examples tokenised now, one per item or (model.data.packing)
    packed; only the splits the run uses (no validation with limit_val_batches=0)."""
    settings, columns = options_from_config(cfg.model)
    return split_layouts(cfg, cfg.trainer.sft, lambda files, key: SFTDataset.from_files(
        files, tokenizer, settings, columns, name=key), default_pack_size=cfg.model.seq_length)


def run_sft(cfg: SFTRunConfig) -> dict:
    start = start_run(cfg)
    train_data, val_data, test_data = load_layouts(cfg, start.tokenizer)
    log_reports({"train": train_data, "validation": val_data, "test": test_data})
    model = build_policy(start)
    algorithm = SFTAlgorithm(SFTSettings.from_config(cfg.model.sft), start.tokenizer.pad_id)
    run = build_run(start, model, algorithm, (train_data, val_data, test_data))
    if cfg.model.data.chat_template is not None:  # export the template the model was trained with
        start.tokenizer.chat_template = cfg.model.data.chat_template
    return train(start, run, algorithm, train_data, val_data, cfg.trainer.sft, test_data=test_data)
