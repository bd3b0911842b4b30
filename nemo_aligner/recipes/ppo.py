"""The PPO recipe (actor, reference, reward model and critic in one job): config -> prompts, the four models
laid out by one parallel plan, the online loop -> outputs.

`run_ppo(cfg)` is what examples/nlp/gpt/train_gpt_ppo.py calls; tests call it directly. Outputs in the log
dir: metrics.jsonl, tensorboard/, checkpoints/ (actor, critic and the optimiser state of both), curves.png,
hf/ (the actor) and critic/ (a `<Family>ForSequenceClassification` folder).
"""

import copy
import logging

from nemo_aligner.algorithms.ppo import PPOAlgorithm, PPOSettings
from nemo_aligner.config.ppo import PPORunConfig
from nemo_aligner.data.layout import layout
from nemo_aligner.data.prompts import PromptDataset, prompt_settings
from nemo_aligner.generation import Sampler
from nemo_aligner.generation.prompts import eos_token_ids
from nemo_aligner.models.offload import move_module
from nemo_aligner.parallel.actor_critic import ActorCriticRun, check_scoring_folders, load_critic
from nemo_aligner.recipes.skeleton import build_policy, build_run, log_reports, start_run, train, used_splits
from nemo_aligner.rewards.reward_model import RewardModel
from nemo_aligner.rollout import RolloutReference

log = logging.getLogger("nemo_aligner")


def load_layouts(cfg: PPORunConfig, tokenizer, settings: PPOSettings):
    """(train, validation or None) prompt layouts; prompts keep their last seq_length - max_new_tokens tokens."""
    max_prompt = cfg.model.seq_length - settings.max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"model.ppo.length_params.max_length={settings.max_new_tokens} leaves no room for a prompt "
                         f"in model.encoder_seq_length / model.data.seq_length={cfg.model.seq_length}")
    prompts = prompt_settings(cfg.model, max_prompt, settings.max_new_tokens)
    files = used_splits(cfg, cfg.trainer.ppo)
    out = []
    for split in ("train", "validation"):
        dataset = (PromptDataset.from_files(files[split], tokenizer, prompts, name=f"model.data.data_prefix.{split}")
                   if files[split] or split == "train" else None)
        out.append(layout(dataset, packing=False, pack_size=0, algorithm="", seed=cfg.model.seed, name=split))
    return tuple(out)


def setup_reference(cfg: PPORunConfig, run, algorithm, reference_copy):
    """None when kl_coef = 0 (no reference pass at all); with LoRA the policy with its adapters off; else a
    frozen copy of the initial policy laid out like it."""
    if not algorithm.settings.needs_reference:
        log.info("model.ppo.kl_coef=0: no reference model, no reference pass")
        return None
    if cfg.model.peft.peft_scheme == "lora":
        return RolloutReference(run.policy, frozen_copy=False)
    return RolloutReference(run.wrap_frozen(reference_copy, algorithm.head()), frozen_copy=True)


def offload(cfg: PPORunConfig, algorithm, device) -> None:
    """model.ppo.offload_*: the frozen models start on the CPU (moved in for their passes), the optimiser's state
    leaves the accelerator during rollouts; nothing moves on a CPU run."""
    ppo = cfg.model.ppo
    algorithm.device = device
    algorithm.offload_optimizer_state = ppo.offload_adam_states
    algorithm.offload_reward_model = ppo.offload_reward_model
    algorithm.offload_reference = ppo.offload_reference and algorithm.reference is not None and algorithm.reference.frozen_copy
    for on, module in ((algorithm.offload_reward_model, algorithm.reward_model.module),
                       (algorithm.offload_reference, algorithm.reference.module if algorithm.offload_reference else None)):
        if on and device.type != "cpu":
            move_module(module, "cpu")


def run_ppo(cfg: PPORunConfig) -> dict:
    cfg.check_reward_model()
    start = start_run(cfg)
    check_scoring_folders(cfg.reward_model.restore_from_path, cfg.critic_path, start.tokenizer)
    ppo = cfg.model.ppo
    settings = PPOSettings.from_config(ppo, cfg.model.seq_length, cfg.model.global_batch_size)
    train_data, val_data = load_layouts(cfg, start.tokenizer, settings)
    log_reports({"train": train_data, "validation": val_data})
    model = build_policy(start)
    algorithm = PPOAlgorithm(settings, pad_id=start.tokenizer.pad_id, seed=cfg.model.seed,
                             num_rollout_samples=ppo.rollout_batches(cfg.model.global_batch_size)[0],
                             forward_micro_batch_size=ppo.forward_micro_batch_size, packed=cfg.model.data.packing,
                             pack_size=cfg.model.data.pack_size, num_val_samples=ppo.num_val_samples)
    lora = cfg.model.peft.peft_scheme == "lora"
    reference_copy = copy.deepcopy(model) if settings.needs_reference and not lora else None  # before sharding
    policy_run = build_run(start, model, algorithm, (train_data, val_data))
    max_rows = max(d.max_row_tokens() for d in (train_data, val_data) if d is not None)
    critic = load_critic(cfg.critic_path, start.parallel, seed=cfg.model.seed)
    run = ActorCriticRun(policy_run, critic, autocast=start.autocast, max_row_tokens=max_rows,
                         critic_source=cfg.critic_path)
    algorithm.reference = setup_reference(cfg, run, algorithm, reference_copy)
    algorithm.reward_model = RewardModel.load(cfg.reward_model.restore_from_path, run=policy_run,
                                              micro_batch_size=ppo.forward_micro_batch_size)
    offload(cfg, algorithm, start.device)
    algorithm.engine = Sampler.for_run(policy_run, start.tokenizer, eos_token_ids(start.tokenizer, start.restore),
                                       batch_size=ppo.rollout_micro_batch_size, autocast=start.autocast)
    return train(start, run, algorithm, train_data, val_data, cfg.trainer.ppo)
