"""DPO (and IPO, RPO, SimPO, ORPO, ...) training with NeMo-Aligner's command line.

    python examples/nlp/gpt/train_gpt_dpo.py                       # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [t.jsonl], validation: [v.jsonl], test: [v.jsonl]}" \\
        exp_manager.explicit_log_dir=/results ++model.dpo.ref_policy_kl_penalty=0.1
    torchrun --nproc_per_node=4 examples/nlp/gpt/train_gpt_dpo.py trainer.devices=4 \\
        model.tensor_model_parallel_size=2 ...                     # 2-way tensor x 2-way data parallel

Config: nemo_aligner/conf/gpt_dpo.yaml (every key documented in nemo_aligner/config/sections.py and config/dpo.py);
the no-argument demo: nemo_aligner/conf/demo/gpt_dpo.yaml. Exit codes: 0 done (or nothing to do), 1 a user error (one
message; NEMO_ALIGNER_TRACEBACK=1 shows the traceback), 75 stopped by SIGTERM / SIGUSR1 / trainer.max_time
with a checkpoint saved (rerun to continue).

The same command as `nemo-aligner dpo`; `--help` lists every key with its default and meaning.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("dpo")  # the same as `nemo-aligner dpo ...` (nemo_aligner/cli.py)
