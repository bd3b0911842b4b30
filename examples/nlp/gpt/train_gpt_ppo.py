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
metrics.jsonl, curves.png. Config: nemo_aligner/conf/gpt_ppo.yaml (every key documented in nemo_aligner/config/ppo.py and
sections.py); the no-argument demo: nemo_aligner/conf/demo/gpt_ppo.yaml. Exit codes: 0 done (or nothing to do), 1 a user
error (one message; NEMO_ALIGNER_TRACEBACK=1 shows the traceback), 75 stopped by SIGTERM / SIGUSR1 /
trainer.max_time with a checkpoint saved (rerun to continue).

The same command as `nemo-aligner ppo`; `--help` lists every key with its default and meaning.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("ppo")  # the same as `nemo-aligner ppo ...` (nemo_aligner/cli.py)
