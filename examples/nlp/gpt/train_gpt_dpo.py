"""DPO (and IPO, RPO, SimPO, ORPO, ...) training with NeMo-Aligner's command line.

    python examples/nlp/gpt/train_gpt_dpo.py                       # the bundled CPU demo
    python examples/nlp/gpt/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/hf/model \\
        "model.data.data_prefix={train: [t.jsonl], validation: [v.jsonl], test: [v.jsonl]}" \\
        exp_manager.explicit_log_dir=/results ++model.dpo.ref_policy_kl_penalty=0.1
    torchrun --nproc_per_node=4 examples/nlp/gpt/train_gpt_dpo.py trainer.devices=4 \\
        model.tensor_model_parallel_size=2 ...                     # 2-way tensor x 2-way data parallel

Config: conf/gpt_dpo.yaml (every key documented in nemo_aligner/config/sections.py and config/dpo.py);
the no-argument demo: conf/demo/gpt_dpo.yaml. Exit codes: 0 done (or nothing to do), 1 a user error (one
message; NEMO_ALIGNER_TRACEBACK=1 shows the traceback), 75 stopped by SIGTERM / SIGUSR1 / trainer.max_time
with a checkpoint saved (rerun to continue).
"""

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config import DPORunConfig
from nemo_aligner.recipes.dpo import run_dpo
from nemo_aligner.recipes.skeleton import main_entry

CONF = Path(__file__).resolve().parent / "conf"
# The typed schema is the base of gpt_dpo.yaml: every documented key can be set without `+`,
# and Hydra rejects unknown keys and wrong types before anything runs.
ConfigStore.instance().store(name="dpo_schema", node=DPORunConfig)


@hydra.main(config_path="conf", config_name="gpt_dpo", version_base="1.3")
def main(raw: DictConfig) -> None:
    # demo preset with no checkpoint and no data; one-line user errors (exit 1); exit 75 when stopped to resume
    main_entry(raw, DPORunConfig, run_dpo, demo=CONF / "demo" / "gpt_dpo.yaml")


if __name__ == "__main__":
    main()
