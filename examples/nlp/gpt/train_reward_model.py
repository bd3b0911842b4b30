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
nemo_aligner/config/sections.py and nemo_aligner/config/rm.py).
"""

import sys

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import ConfigError, load_config
from nemo_aligner.config import RMRunConfig
from nemo_aligner.data.rows import DataError
from nemo_aligner.recipes.rm import run_rm

# The typed schema is the base of training_rm.yaml: every documented key can be set without `+`,
# and Hydra rejects unknown keys and wrong types before anything runs.
ConfigStore.instance().store(name="rm_schema", node=RMRunConfig)


@hydra.main(config_path="conf", config_name="training_rm", version_base="1.3")
def main(raw: DictConfig) -> None:
    try:
        cfg = load_config(raw, RMRunConfig)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    try:
        run_rm(cfg)
    except DataError as err:  # a bad row or file: its file:line, no traceback
        sys.exit(f"data error: {err}")


if __name__ == "__main__":
    main()
