"""Supervised fine-tuning with NeMo-Aligner's command line.

    python examples/nlp/gpt/train_gpt_sft.py                       # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_sft.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [t.jsonl], validation: [v.jsonl], test: [v.jsonl]}" \\
        exp_manager.explicit_log_dir=/results model.data.packing=true

Rows may be NeMo chat (`conversations`), TRL (`messages` or `prompt`/`completion`) or ROLL
(`instruction`/`input`/`output`), detected per row. Config: conf/gpt_sft.yaml (every key documented
in nemo_aligner/config/sections.py and nemo_aligner/config/sft.py); the no-argument demo:
conf/demo/gpt_sft.yaml. Exit codes as train_gpt_dpo.py: 0 done, 1 a user error, 75 stopped (rerun to continue).
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import SFTRunConfig
from nemo_aligner.recipes.sft import run_sft
from nemo_aligner.recipes.skeleton import main_entry

CONF = Path(__file__).resolve().parent / "conf"
# The typed schema is the base of gpt_sft.yaml: every documented key can be set without `+`,
# and Hydra rejects unknown keys and wrong types before anything runs.
ConfigStore.instance().store(name="sft_schema", node=SFTRunConfig)


@hydra.main(config_path="conf", config_name="gpt_sft", version_base="1.3")
def main(raw: DictConfig) -> None:
    # demo preset with no checkpoint and no data; one-line user errors (exit 1); exit 75 when stopped to resume
    main_entry(raw, SFTRunConfig, run_sft, demo=CONF / "demo" / "gpt_sft.yaml")


if __name__ == "__main__":
    main()
