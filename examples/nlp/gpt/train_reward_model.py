"""Reward-model training (Bradley-Terry on preference pairs) with NeMo-Aligner's command line.

    python examples/nlp/gpt/train_reward_model.py                  # the bundled CPU demo
    python examples/nlp/gpt/train_reward_model.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [t.jsonl], validation: [v.jsonl], test: [v.jsonl]}" \\
        exp_manager.explicit_log_dir=/results
    torchrun --nproc_per_node=4 examples/nlp/gpt/train_reward_model.py trainer.devices=4 \\
        model.tensor_model_parallel_size=2 ...                     # 2-way tensor x 2-way data parallel

Data: every preference row shape DPO reads, NeMo-Aligner's comparison files (`{"text": prompt + chosen}`
then `{"text": prompt + rejected}` on consecutive lines) and NeMo-RL rows (`context` + ranked
`completions`). A causal-LM checkpoint starts with a fresh score head; hf/ is a
`<Family>ForSequenceClassification` folder. Config: nemo_aligner/conf/training_rm.yaml (every key documented in
nemo_aligner/config/sections.py and nemo_aligner/config/rm.py); the no-argument demo: nemo_aligner/conf/demo/training_rm.yaml.
Exit codes: 0 done (or nothing to do), 1 a user error (one message; NEMO_ALIGNER_TRACEBACK=1 shows the
traceback), 75 stopped by SIGTERM / SIGUSR1 / trainer.max_time with a checkpoint saved (rerun to continue).

The same command as `nemo-aligner rm`; `--help` lists every key with its default and meaning.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("rm")  # the same as `nemo-aligner rm ...` (nemo_aligner/cli.py)
