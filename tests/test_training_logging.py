"""Metrics logging (nemo_aligner/training/logging.py): JSON lines, TensorBoard, resume, plots, W&B guard."""

import json
import math
import sys

import pytest
import torch

from nemo_aligner.training.logging import MetricsLogger, ProgressBar, plot_curves, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(log_dir, steps, resume_step=0, offset=0.0, **kwargs):
    logger = MetricsLogger(log_dir, resume_step=resume_step, **kwargs)
    for step in steps:
        metrics = {"train/loss": 1.0 / step + offset, "train/acc": torch.tensor(0.5), "train/consumed_samples": 8 * step}
        if step % 2 == 0:
            metrics |= {"val/loss": 2.0 / step + offset, "val/acc": 0.75}
        logger.log(step, metrics)
    return logger


def lines(log_dir):
    return (log_dir / "metrics.jsonl").read_text().splitlines()


def tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_one_json_line_per_log_call(tmp_path):
    logger = write_run(tmp_path, [1, 2, 3], tensorboard=False)
    records = [json.loads(line) for line in lines(tmp_path)]  # flushed before close
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1] == {"step": 2, "train/loss": 0.5, "train/acc": 0.5, "train/consumed_samples": 16,
                          "val/loss": 1.0, "val/acc": 0.75}
    assert isinstance(records[0]["train/acc"], float)  # the tensor went through .item()
    logger.close()
    assert read_metrics(tmp_path) == records == MetricsLogger.read_metrics(tmp_path / "metrics.jsonl")


def test_tensorboard_scalars_readable(tmp_path):
    write_run(tmp_path, [1, 2, 3]).close()
    assert tb_scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert tb_scalars(tmp_path, "val/acc") == [(2, 0.75)]


def test_resume_drops_lines_after_checkpoint_and_keeps_earlier_exactly(tmp_path):
    write_run(tmp_path, range(1, 8)).close()  # interrupted run got to step 7; last checkpoint at step 4
    before = lines(tmp_path)
    resumed = MetricsLogger(tmp_path, resume_step=4)
    assert lines(tmp_path) == before[:4]
    for step in (5, 6):
        resumed.log(step, {"train/loss": 10.0 + step})
    resumed.close()
    assert lines(tmp_path)[:4] == before[:4]
    assert [json.loads(line)["step"] for line in lines(tmp_path)] == [1, 2, 3, 4, 5, 6]
    # TensorBoard hides the interrupted run's steps 5..7 in favour of the resumed ones.
    assert tb_scalars(tmp_path, "train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25),
                                                  (5, 15.0), (6, 16.0)]


def test_resume_skips_line_cut_short_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/lo')
    MetricsLogger(tmp_path, resume_step=3, tensorboard=False).close()
    assert lines(tmp_path) == ['{"step": 1, "train/loss": 1.0}']


def test_fresh_run_truncates_existing_log(tmp_path):
    write_run(tmp_path, [1, 2, 3]).close()
    write_run(tmp_path, [1], offset=5.0).close()
    assert [json.loads(line)["train/loss"] for line in lines(tmp_path)] == [6.0]
    assert tb_scalars(tmp_path, "train/loss") == [(1, 6.0)]


def test_non_finite_values_become_null(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"train/loss": float("nan"), "train/grad_norm": torch.tensor(float("inf")), "train/acc": 0.5})
    logger.close()
    assert json.loads(lines(tmp_path)[0]) == {"step": 1, "train/loss": None, "train/grad_norm": None,
                                              "train/acc": 0.5}
    assert math.isnan(tb_scalars(tmp_path, "train/loss")[0][1])  # TensorBoard keeps the raw value


def test_close_writes_curves_png(tmp_path):
    write_run(tmp_path, range(1, 7), tensorboard=False).close()
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_curves_groups_train_and_val(tmp_path):
    import nemo_aligner.training.logging as metrics_logging

    write_run(tmp_path, range(1, 5), tensorboard=False).close()
    series = metrics_logging._collect_series(read_metrics(tmp_path))
    assert list(series) == ["loss", "acc", "consumed_samples"]
    assert series["loss"]["train"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.25)]
    assert series["loss"]["val"] == [(2, 1.0), (4, 0.5)]


def test_plot_curves_with_nothing_numeric_writes_nothing(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/note": "hello", "train/loss": null}\n')
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    plot_curves(tmp_path / "missing.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_wandb_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail even where it is installed
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path / "run", wandb=True)
    assert not (tmp_path / "run").exists()


def test_wandb_receives_config_and_metrics(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, metrics, step):
            calls.append(("log", metrics, step))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            calls.append(("init", kwargs))
            return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    logger = MetricsLogger(tmp_path, tensorboard=False, wandb=True, run_config={"lr": 1e-3},
                           wandb_kwargs={"project": "p", "name": None})
    logger.log(3, {"train/loss": 0.5, "train/note": "x"})
    logger.close()
    assert calls == [("init", {"dir": str(tmp_path), "config": {"lr": 1e-3}, "mode": "offline", "project": "p"}),
                     ("log", {"train/loss": 0.5}, 3), ("finish",)]


def test_not_rank_zero_writes_nothing(tmp_path):
    write_run(tmp_path / "run", [1, 2], is_rank_zero=False, wandb=True).close()
    assert not (tmp_path / "run").exists()


def test_progress_bar_postfix(capsys):
    bar = ProgressBar(total=10, initial=2)
    bar.update(3, {"loss": 0.693147, "acc": None, "tok/s": 12345.678})
    assert bar._bar.n == 3
    assert bar._bar.postfix == "loss=0.6931, tok/s=1.235e+04"
    bar.close()
    disabled = ProgressBar(total=10, enabled=False)
    disabled.update(5, {"loss": 1.0})
    disabled.close()
    assert "loss=1" not in capsys.readouterr().err
