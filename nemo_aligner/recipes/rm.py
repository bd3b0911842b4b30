"""The reward-model recipe (Bradley-Terry on preference pairs): config -> pairs, score model, loop -> outputs.

`run_rm(cfg)` is what examples/nlp/gpt/train_reward_model.py calls; tests call it directly. The model
is a `models.score.ScoreModel` (a reward model's checkpoint, or a causal LM with a fresh head).
Outputs in the log dir, as for DPO: metrics.jsonl, tensorboard/, checkpoints/, curves.png, and hf/ as
a `<Family>ForSequenceClassification` folder (with LoRA: PEFT adapters plus the head, or merged).
"""

from nemo_aligner.algorithms.rm import RewardModelAlgorithm, RewardSettings
from nemo_aligner.config.rm import RMRunConfig
from nemo_aligner.data.dataset import TokenizeSettings
from nemo_aligner.data.layout import DataLayout
from nemo_aligner.data.preference.reward import reward_pairs_from_files
from nemo_aligner.data.preference.rows import PreferenceColumns
from nemo_aligner.models.score import SEQUENCE_CLASSIFICATION
from nemo_aligner.recipes.skeleton import build_policy, build_run, log_reports, split_layouts, start_run, train


def load_layouts(cfg: RMRunConfig, tokenizer) -> tuple[DataLayout, DataLayout | None, DataLayout | None]:
    """(train, validation or None, test or None): pairs tokenised now, one per item or (model.data.packing)
    packed; only the splits the run uses (skeleton.used_splits)."""
    data, model = cfg.model.data, cfg.model
    settings = TokenizeSettings(seq_length=model.seq_length, overlength=data.overlength,
                                chat_template=data.chat_template, add_bos=data.add_bos, add_eos=data.add_eos)
    columns = PreferenceColumns(prompt=data.prompt_key, chosen=data.chosen_key, rejected=data.rejected_key,
                                input=data.input_key)
    return split_layouts(cfg, cfg.trainer.rm, lambda files, key: reward_pairs_from_files(
        files, tokenizer, settings, columns, data.margin_key, name=key), default_pack_size=2 * model.seq_length)


def run_rm(cfg: RMRunConfig) -> dict:
    start = start_run(cfg)
    train_data, val_data, test_data = load_layouts(cfg, start.tokenizer)
    log_reports({"train": train_data, "validation": val_data, "test": test_data})
    model = build_policy(start, task=SEQUENCE_CLASSIFICATION)
    algorithm = RewardModelAlgorithm(RewardSettings.from_config(cfg.model), start.tokenizer.pad_id)
    run = build_run(start, model, algorithm, (train_data, val_data, test_data))
    if cfg.model.data.chat_template is not None:  # export the template the scores were trained on
        start.tokenizer.chat_template = cfg.model.data.chat_template
    return train(start, run, algorithm, train_data, val_data, cfg.trainer.rm, test_data=test_data)
