"""The GRPO recipe (and DAPO, Dr. GRPO, GSPO, BNPO, RLOO, REINFORCE++): config -> prompts, rewards, model,
generation engine, reference, loop.

`run_grpo(cfg)` is what examples/nlp/gpt/train_gpt_grpo.py calls; tests call it directly. Outputs in the
log dir: metrics.jsonl, tensorboard/, checkpoints/, hf/, curves.png, rollouts.jsonl (model.grpo.log_rollouts).
"""

import copy
import logging

from nemo_aligner.algorithms.grpo import GRPOAlgorithm, GRPOSettings
from nemo_aligner.config.grpo import GRPORunConfig
from nemo_aligner.data.layout import padded_layout
from nemo_aligner.data.prompts import PromptDataset, prompt_settings
from nemo_aligner.generation import Sampler, eos_token_ids
from nemo_aligner.recipes.skeleton import (
    build_policy, build_run, check_folder, log_reports, start_run, train, used_splits,
)
from nemo_aligner.rewards import RewardFunctions
from nemo_aligner.rewards.reward_model import RewardModel
from nemo_aligner.rollout import RolloutReference

log = logging.getLogger("nemo_aligner")
SPLITS = ("train", "validation", "test")


def load_layouts(cfg: GRPORunConfig, tokenizer) -> tuple:
    """(train, validation or None, test or None) prompt layouts: one item per prompt."""
    g, files = cfg.model.grpo, used_splits(cfg, cfg.trainer.grpo)
    settings = prompt_settings(cfg.model, g.max_prompt_length, g.max_completion_length)
    return tuple(padded_layout(PromptDataset.from_files(files[split], tokenizer, settings,
                                                        name=f"model.data.data_prefix.{split}")
                               if files[split] or split == "train" else None) for split in SPLITS)


def load_rewards(g, restore) -> tuple:
    """(the reward functions or None, the reward model's weight): specs loaded and the reward model's folder
    checked before any model is built; reward_weights list the functions first, then the reward model."""
    weights = list(g.reward_weights) if g.reward_weights is not None else [1.0] * g.num_rewards
    if g.reward_model_path:
        check_folder(g.reward_model_path, "model.grpo.reward_model_path", "a *ForSequenceClassification folder")
    if g.reward_funcs or not g.reward_model_path:  # neither: RewardFunctions names the missing key
        functions = RewardFunctions.from_specs(g.reward_funcs, weights[:len(g.reward_funcs)],
                                               untrusted_dirs=[restore] if restore else [])
    else:
        functions = None
    return functions, weights[-1]


def build_engine(cfg: GRPORunConfig, start, run):
    """The built-in sampler on the live policy, or vLLM colocated (weights synced after each step)."""
    g, eos = cfg.model.grpo, eos_token_ids(start.tokenizer, start.restore)
    if g.engine == "vllm":
        from nemo_aligner.generation.vllm_engine import VLLMEngine

        if start.parallel.distributed or not start.restore:
            raise ValueError("model.grpo.engine=vllm runs in one process on a checkpoint "
                             "(pretrained_checkpoint.restore_from_path); use engine=builtin otherwise")
        engine = VLLMEngine(start.restore, start.tokenizer, eos, max_num_seqs=g.generation_batch_size,
                            seed=cfg.model.seed, scorer=run.model)
        engine.sync_weights(run.model)  # LoRA adapters / a resumed checkpoint: generate with the run's weights
        return engine
    return Sampler.for_run(run, start.tokenizer, eos, batch_size=g.generation_batch_size, autocast=start.autocast)


def build_reference(run, algorithm, reference_copy):
    """beta > 0: a frozen copy laid out like the policy, or (LoRA) the policy with its adapters off."""
    if not algorithm.settings.needs_reference:
        log.info("model.grpo.beta=0: no KL term, no reference pass")
        return None
    if reference_copy is None:
        return RolloutReference(run.policy, frozen_copy=False)
    return RolloutReference(run.wrap_frozen(reference_copy, algorithm.head()), frozen_copy=True)


def run_grpo(cfg: GRPORunConfig) -> dict:
    start = start_run(cfg)
    train_data, val_data, test_data = load_layouts(cfg, start.tokenizer)
    log_reports({"train": train_data, "validation": val_data, "test": test_data})
    g, data = cfg.model.grpo, cfg.model.data
    rewards, rm_weight = load_rewards(g, start.restore)
    model = build_policy(start)
    algorithm = GRPOAlgorithm(GRPOSettings.from_config(g), rewards, pad_id=start.tokenizer.pad_id,
                              global_batch_size=cfg.model.global_batch_size, seed=cfg.model.seed,
                              micro_batch_size=cfg.model.micro_batch_size, packed=data.packing,
                              pack_size=data.pack_size,
                              rollouts_file=start.log_dir / "rollouts.jsonl" if g.log_rollouts else None,
                              reward_model_weight=rm_weight)
    lora = cfg.model.peft.peft_scheme == "lora"
    reference_copy = copy.deepcopy(model) if algorithm.settings.needs_reference and not lora else None
    run = build_run(start, model, algorithm, (train_data, val_data, test_data))
    algorithm.engine = build_engine(cfg, start, run)
    if g.reward_model_path:  # laid out like the policy, scoring the policy's token ids
        algorithm.reward_model = RewardModel.load(g.reward_model_path, run=run, pad_id=start.tokenizer.pad_id,
                                                  micro_batch_size=cfg.model.micro_batch_size)
    algorithm.reference = build_reference(run, algorithm, reference_copy)
    return train(start, run, algorithm, train_data, val_data, cfg.trainer.grpo, test_data=test_data)
