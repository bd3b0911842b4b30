"""GRPO (and DAPO, Dr. GRPO, GSPO, BNPO, RLOO, REINFORCE++) with verifiable rewards.

    python examples/nlp/gpt/train_gpt_grpo.py                      # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_grpo.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [prompts.jsonl], validation: [val.jsonl]}" \\
        "model.grpo.reward_funcs=[accuracy_last_number]" exp_manager.explicit_log_dir=/results/grpo

Rows: `prompt` (a string used verbatim, or a list of messages through the chat template) plus any other
columns (e.g. `answer`), which reward functions receive as keyword lists. Config: nemo_aligner/conf/gpt_grpo.yaml
(every key documented in nemo_aligner/config/sections.py and nemo_aligner/config/grpo.py); the
no-argument demo: nemo_aligner/conf/demo/gpt_grpo.yaml. The same as `nemo-aligner grpo ...`. Exit codes: 0 done, 1 a user error, 75 stopped (rerun to continue).
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("grpo")  # the same as `nemo-aligner grpo ...` (nemo_aligner/cli.py)
