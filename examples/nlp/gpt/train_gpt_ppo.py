"""PPO with a reward model and a critic (actor, reference, reward model and critic in one job) with
NeMo-Aligner's command line and TRL PPOConfig's semantics.

    python examples/nlp/gpt/train_gpt_ppo.py                    # the bundled CPU demo (trains its reward model first)
    python examples/nlp/gpt/train_gpt_ppo.py pretrained_checkpoint.restore_from_path=/hf/sft_model \\
        reward_model.restore_from_path=/results/rm/hf \\
        "model.data.data_prefix={train: [prompts_train.jsonl], validation: [prompts_val.jsonl]}" \\
        exp_manager.explicit_log_dir=/results/ppo
    torchrun --nproc_per_node=4 examples/nlp/gpt/train_gpt_ppo.py trainer.devices=4 ...   # 4-way data parallel

Prompts: jsonl / parquet rows with a `prompt` (a string used verbatim, or messages through the chat
template; model.data.prompt_key). The critic starts from the reward model unless critic.restore_from_path
says otherwise. Outputs: hf/ (the actor), critic/ (a *ForSequenceClassification folder), checkpoints/,
metrics.jsonl, curves.png. Config: conf/gpt_ppo.yaml (every key documented in nemo_aligner/config/ppo.py and
sections.py); the no-argument demo: conf/demo/gpt_ppo.yaml. Exit codes: 0 done (or nothing to do), 1 a user
error (one message; NEMO_ALIGNER_TRACEBACK=1 shows the traceback), 75 stopped by SIGTERM / SIGUSR1 /
trainer.max_time with a checkpoint saved (rerun to continue).
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import PPORunConfig, RMRunConfig, load_config
from nemo_aligner.config.presets import is_demo_run, with_preset
from nemo_aligner.recipes.ppo import run_ppo
from nemo_aligner.recipes.rm import run_rm
from nemo_aligner.recipes.skeleton import main_entry

CONF = Path(__file__).resolve().parent / "conf"
ConfigStore.instance().store(name="ppo_schema", node=PPORunConfig)


def with_demo_reward_model(cfg: PPORunConfig) -> dict:
    """The demo scores with the reward model that train_reward_model.py's own demo trains: trained here first,
    exactly as that script would (same preset, same log dir), when its hf/ is not there yet; then PPO."""
    rm_demo = load_config(with_preset({}, CONF / "demo" / "training_rm.yaml"), RMRunConfig)
    wanted = Path(cfg.reward_model.restore_from_path)
    if wanted == Path(rm_demo.exp_manager.explicit_log_dir) / "hf" and not wanted.is_dir():
        run_rm(rm_demo)
    return run_ppo(cfg)


@hydra.main(config_path="conf", config_name="gpt_ppo", version_base="1.3")
def main(raw: DictConfig) -> None:
    # demo preset with no checkpoint and no data (its reward model trained first when missing, after the config
    # is checked); one-line user errors (exit 1); exit 75 when stopped to resume
    run = with_demo_reward_model if is_demo_run(raw) else run_ppo
    main_entry(raw, PPORunConfig, run, demo=CONF / "demo" / "gpt_ppo.yaml")


if __name__ == "__main__":
    main()
