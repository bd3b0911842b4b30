"""Shared test helpers: run configs composed from the shipped YAML, the demo preset and command-line
overrides, metrics files, and one micro-batch's loss through the model + head exactly as the executors
run it."""

import json
from pathlib import Path

from omegaconf import OmegaConf

from nemo_aligner.config import DPORunConfig, SFTRunConfig, load_config
from nemo_aligner.config.presets import with_preset
from nemo_aligner.models.heads import ModelWithHead

ROOT = Path(__file__).resolve().parents[1]
DPO_YAML = ROOT / "nemo_aligner/conf/gpt_dpo.yaml"
SFT_YAML = ROOT / "nemo_aligner/conf/gpt_sft.yaml"
DEMO_DIR = ROOT / "nemo_aligner/conf/demo"  # conf/demo/<script's yaml>: what the no-argument scripts apply
DEMO_TRAIN = ROOT / "nemo_aligner/demo/data/dpo_train.jsonl"
DEMO_VAL = ROOT / "nemo_aligner/demo/data/dpo_val.jsonl"

# A small, fast variant of the DPO demo for tests.
FAST = [
    "model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
    "model.num_query_groups=1", "model.micro_batch_size=4", "model.global_batch_size=8",
    "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=2", "exp_manager.progress_bar=false",
    f"model.data.data_prefix.train=[{DEMO_TRAIN}]", f"model.data.data_prefix.validation=[{DEMO_VAL}]",
]


def compose(yaml, schema, log_dir, *overrides, demo=True):
    """The run config of `<script> exp_manager.explicit_log_dir=<log_dir> <overrides>`, with the demo's
    preset under the overrides (tests train the demo's tiny model on toy data) unless demo=False (the
    schema's real defaults, as a run on a checkpoint with data gets them)."""
    raw = OmegaConf.load(yaml)
    raw.pop("defaults", None)
    raw.pop("hydra", None)
    overrides = [f"exp_manager.explicit_log_dir={log_dir}", *overrides]
    return load_config(with_preset(raw, DEMO_DIR / Path(yaml).name if demo else None, overrides), schema)


def dpo_config(log_dir, *overrides, yaml=DPO_YAML, schema=DPORunConfig, demo=True):
    return compose(yaml, schema, log_dir, *overrides, demo=demo)


def sft_config(log_dir, *overrides, yaml=SFT_YAML, schema=SFTRunConfig, demo=True):
    return compose(yaml, schema, log_dir, *overrides, demo=demo)


def read_metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


TIMING_KEYS = ("train/step_time", "train/tokens_per_sec")


def comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def assert_same_trajectory(straight: list[dict], resumed: list[dict], steps: int, same_keys: bool = True) -> None:
    """A resumed run's metrics rows equal a straight run's, step for step (timings aside), to 1e-6."""
    import pytest

    straight, resumed = [comparable(r) for r in straight], [comparable(r) for r in resumed]
    assert [r["step"] for r in resumed] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed):
        if same_keys:
            assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6, rel=0), (a["step"], key)


def micro_batch_loss(algorithm, model, batch, num_units: int):
    """(loss, metric sums) of one micro-batch: `model` ending in `algorithm.head()`, then `algorithm.loss`."""
    module = model if isinstance(model, ModelWithHead) else ModelWithHead(model, algorithm.head())
    outputs = module(batch.input_ids, **batch.model_inputs())
    return algorithm.loss(batch, outputs, num_units)


def one_process_run(model, head):
    """The run object of a single process (what every recipe builds when not launched with torchrun)."""
    from nemo_aligner.parallel.mesh import Parallel
    from nemo_aligner.parallel.run import ParallelRun

    return ParallelRun(Parallel(), model, head)
