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
`<Family>ForSequenceClassification` folder. Config: conf/training_rm.yaml (every key documented in
nemo_aligner/config/sections.py and nemo_aligner/config/rm.py); the no-argument demo: conf/demo/training_rm.yaml.
Exit codes: 0 done (or nothing to do), 1 a user error (one message; NEMO_ALIGNER_TRACEBACK=1 shows the
traceback), 75 stopped by SIGTERM / SIGUSR1 / trainer.max_time with a checkpoint saved (rerun to continue).
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import RMRunConfig
from nemo_aligner.recipes.rm import run_rm
from nemo_aligner.recipes.skeleton import main_entry

CONF = Path(__file__).resolve().parent / "conf"
# The typed schema is the base of training_rm.yaml: every documented key can be set without `+`,
# and Hydra rejects unknown keys and wrong types before anything runs.
ConfigStore.instance().store(name="rm_schema", node=RMRunConfig)


@hydra.main(config_path="conf", config_name="training_rm", version_base="1.3")
def main(raw: DictConfig) -> None:
    # demo preset with no checkpoint and no data; one-line user errors (exit 1); exit 75 when stopped to resume
    main_entry(raw, RMRunConfig, run_rm, demo=CONF / "demo" / "training_rm.yaml")


if __name__ == "__main__":
    main()
