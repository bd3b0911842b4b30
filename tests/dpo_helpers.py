"""Build DPO run configs for tests from the shipped gpt_dpo.yaml plus dotlist overrides."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from nemo_aligner.config import load_config
from nemo_aligner.config.schema import DPORunConfig

ROOT = Path(__file__).resolve().parents[1]
DPO_YAML = ROOT / "examples/nlp/gpt/conf/gpt_dpo.yaml"
DEMO_TRAIN = ROOT / "examples/demo/data/dpo_train.jsonl"
DEMO_VAL = ROOT / "examples/demo/data/dpo_val.jsonl"

# A small, fast variant of the demo for tests.
FAST = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.micro_batch_size=4", "model.global_batch_size=8",
    "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=2", "exp_manager.progress_bar=false",
    f"model.data.data_prefix.train=[{DEMO_TRAIN}]", f"model.data.data_prefix.validation=[{DEMO_VAL}]",
]


def dpo_config(log_dir, *overrides, yaml=DPO_YAML, schema=DPORunConfig):
    raw = OmegaConf.to_container(OmegaConf.load(yaml))
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    merged = OmegaConf.merge(raw, OmegaConf.from_dotlist([f"exp_manager.explicit_log_dir={log_dir}", *overrides]))
    return load_config(merged, schema)


def read_metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = ("train/step_time", "train/tokens_per_sec")


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}
