"""Supervised fine-tuning with NeMo-Aligner's command line.

    python examples/nlp/gpt/train_gpt_sft.py                       # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_sft.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [t.jsonl], validation: [v.jsonl], test: [v.jsonl]}" \\
        exp_manager.explicit_log_dir=/results model.data.packing=true

Rows may be NeMo chat (`conversations`), TRL (`messages` or `prompt`/`completion`) or ROLL
(`instruction`/`input`/`output`), detected per row. Config: nemo_aligner/conf/gpt_sft.yaml (every key documented
in nemo_aligner/config/sections.py and nemo_aligner/config/sft.py); the no-argument demo:
nemo_aligner/conf/demo/gpt_sft.yaml. Exit codes as train_gpt_dpo.py: 0 done, 1 a user error, 75 stopped (rerun to continue).

The same command as `nemo-aligner sft`; `--help` lists every key with its default and meaning.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("sft")  # the same as `nemo-aligner sft ...` (nemo_aligner/cli.py)
