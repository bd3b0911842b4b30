"""Trajectory invariants of the shared loop: gradient accumulation never changes a step.

The loss of every algorithm is normalised by its units (pairs, tokens, sequences) in the *global*
batch, so the same global batch cut into 8 micro-batches of 1 or 1 micro-batch of 8 must give the
same losses, metrics and gradient norms step after step (fp32 summation order aside).
"""

import math

import pytest

from nemo_aligner.recipes.dpo import run_dpo
from nemo_aligner.recipes.sft import run_sft
from tests.helpers import DEMO_TRAIN, DEMO_VAL, FAST, ROOT, comparable, dpo_config, read_metrics, sft_config

STEPS = ["trainer.dpo.max_steps=3", "trainer.dpo.val_check_interval=3", "model.global_batch_size=8",
         "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false"]
SFT = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
       "model.num_query_groups=1", "model.global_batch_size=8", "trainer.sft.max_steps=3",
       "trainer.sft.val_check_interval=3", "exp_manager.progress_bar=false",
       "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false"]


@pytest.fixture(autouse=True)
def no_plot(monkeypatch):
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)


def assert_same_rows(a: list[dict], b: list[dict]):
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for x, y in zip(a, b):
        x, y = comparable(x), comparable(y)
        assert x.keys() == y.keys()
        for key, value in x.items():
            assert math.isclose(value, y[key], rel_tol=1e-5, abs_tol=1e-6), (x["step"], key, value, y[key])


def _head(src, tmp_path, n: int):
    out = tmp_path / src.name
    out.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return out


def test_dpo_micro_batch_1_and_8_give_the_same_steps(tmp_path):
    data = [f"model.data.data_prefix.train=[{_head(DEMO_TRAIN, tmp_path, 32)}]",
            f"model.data.data_prefix.validation=[{_head(DEMO_VAL, tmp_path, 16)}]"]
    for micro in (1, 8):
        run_dpo(dpo_config(tmp_path / f"m{micro}", *FAST, *STEPS, *data, f"model.micro_batch_size={micro}",
                           "model.dpo.sft_loss_weight=0.1"))
    rows = [read_metrics(tmp_path / f"m{micro}") for micro in (1, 8)]
    assert rows[0][0]["train/grad_norm"] > 0 and "val/loss" in rows[0][-1]
    assert_same_rows(*rows)


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_sft_micro_batch_1_and_8_give_the_same_steps(tmp_path, normalization):
    demo = ROOT / "nemo_aligner/demo/data"
    data = [f"model.data.data_prefix.train=[{_head(demo / 'sft_train.jsonl', tmp_path, 32)}]",
            f"model.data.data_prefix.validation=[{_head(demo / 'sft_val.jsonl', tmp_path, 16)}]"]
    for micro in (1, 8):
        run_sft(sft_config(tmp_path / f"m{micro}", *SFT, *data, f"model.micro_batch_size={micro}",
                           f"model.sft.loss_normalization={normalization}"))
    rows = [read_metrics(tmp_path / f"m{micro}") for micro in (1, 8)]
    assert rows[0][0]["train/grad_norm"] > 0 and "val/token_acc" in rows[0][-1]
    assert_same_rows(*rows)
