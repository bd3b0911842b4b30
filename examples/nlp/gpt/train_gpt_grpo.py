"""GRPO (and DAPO, Dr. GRPO, GSPO, BNPO, RLOO, REINFORCE++) with verifiable rewards.

    python examples/nlp/gpt/train_gpt_grpo.py                      # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_grpo.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [prompts.jsonl], validation: [val.jsonl]}" \\
        "model.grpo.reward_funcs=[accuracy_last_number]" exp_manager.explicit_log_dir=/results/grpo

Rows: `prompt` (a string used verbatim, or a list of messages through the chat template) plus any other
columns (e.g. `answer`), which reward functions receive as keyword lists. Config: conf/gpt_grpo.yaml
(every key documented in nemo_aligner/config/sections.py and nemo_aligner/config/grpo.py); the
no-argument demo: conf/demo/gpt_grpo.yaml. Exit codes: 0 done, 1 a user error, 75 stopped (rerun to continue).
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import GRPORunConfig
from nemo_aligner.recipes.grpo import run_grpo
from nemo_aligner.recipes.skeleton import main_entry

CONF = Path(__file__).resolve().parent / "conf"
# The typed schema is the base of gpt_grpo.yaml: every documented key can be set without `+`,
# and Hydra rejects unknown keys and wrong types before anything runs.
ConfigStore.instance().store(name="grpo_schema", node=GRPORunConfig)


@hydra.main(config_path="conf", config_name="gpt_grpo", version_base="1.3")
def main(raw: DictConfig) -> None:
    # demo preset with no checkpoint and no data; one-line user errors (exit 1); exit 75 when stopped to resume
    main_entry(raw, GRPORunConfig, run_grpo, demo=CONF / "demo" / "gpt_grpo.yaml")


if __name__ == "__main__":
    main()
