"""Where training metrics go: a JSON-lines file (always), TensorBoard, W&B, a PNG of the curves, and
the terminal progress bar.

`<log_dir>/metrics.jsonl` is the source of truth: one line `{"step": N, "train/loss": ..., ...}`
per `MetricsLogger.log` call, flushed at once so a killed run keeps everything it logged. It is
strict JSON: NaN and +/-inf are written as `null` (TensorBoard and W&B still get the raw value).
On resume from the checkpoint at step N, lines the interrupted run wrote after N are dropped (and
TensorBoard is told to purge them), so the log matches that of an uninterrupted run.

W&B is optional and imported only when enabled. Only rank 0 logs; on other ranks every call is a
no-op.
"""

import json
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
SPLITS = ("train", "val", "validation", "test")


class MetricsLogger:
    def __init__(self, log_dir, *, tensorboard: bool = True, wandb: bool = False, wandb_kwargs: dict | None = None,
                 run_config: dict | None = None, resume_step: int = 0, is_rank_zero: bool = True):
        """`wandb_kwargs` go to `wandb.init` (`project`, `name`, `mode` = "offline" unless given; to
        continue the same W&B run after a resume, pass its `id` and `resume="allow"`)."""
        self.log_dir = Path(log_dir)
        self.enabled = is_rank_zero
        self._file = self._tb = self._wandb = None
        if not self.enabled:
            return
        if resume_step < 0:
            raise ValueError(f"resume_step={resume_step} must be >= 0")
        wandb_module = _import_wandb() if wandb else None  # fail before anything is written
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / METRICS_FILE
        if resume_step > 0:
            _drop_lines_after(path, resume_step)
        self._file = open(path, "a" if resume_step > 0 else "w", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides older events with step >= purge_step: those of an interrupted run
            # after its checkpoint, or all of them when a run starts over in the same folder.
            purge_step = resume_step + 1 if resume_step > 0 else 0
            self._tb = SummaryWriter(str(self.log_dir / TENSORBOARD_DIR), purge_step=purge_step)
        if wandb_module is not None:
            kwargs = {"mode": "offline", **{k: v for k, v in (wandb_kwargs or {}).items() if v is not None}}
            self._wandb = wandb_module.init(dir=str(self.log_dir), config=run_config, **kwargs)

    def log(self, step: int, metrics: dict) -> None:
        """Record already-prefixed metrics (`train/loss`, `val/acc`, ...) for optimiser step `step`."""
        if not self.enabled:
            return
        values = {name: _to_python(value) for name, value in metrics.items()}
        record = {"step": int(step), **{name: _json_safe(value) for name, value in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        numeric = {name: value for name, value in values.items() if _is_number(value)}
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, int(step))
        if self._wandb is not None:
            self._wandb.log(numeric, step=int(step))

    def close(self) -> None:
        """Flush and close every sink, then draw `<log_dir>/curves.png`. Safe to call twice."""
        if not self.enabled or self._file is None:
            return
        self._file.close()
        self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        plot_curves(self.log_dir / METRICS_FILE, self.log_dir / CURVES_FILE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ImportError("exp_manager.create_wandb_logger=True needs Weights & Biases: `pip install wandb` "
                          "(or `pip install nemo_aligner[wandb]`), or set exp_manager.create_wandb_logger=False"
                          ) from err
    return wandb


def _to_python(value):
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":  # 0-d tensors, numpy scalars
        return value.item()
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_safe(value):
    # Standard JSON has no NaN/inf; null keeps every line parseable by any JSON reader.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _drop_lines_after(path: Path, step: int) -> None:
    """Keep, byte for byte, the lines with step <= `step`; rewrite atomically so a kill here loses nothing."""
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                line_step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short when the run was killed
            if line_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def read_metrics(log_dir) -> list[dict]:
    """The records of `<log_dir>/metrics.jsonl` (or of the .jsonl file given), skipping cut-short lines."""
    path = Path(log_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


MetricsLogger.read_metrics = staticmethod(read_metrics)


# -------------------------------------------------------------------------------------------- plots
def plot_curves(metrics_jsonl_path, png_path) -> None:
    """One panel per metric base name (`loss`, `acc`, ...), train as a line and val as markers.

    Uses an Agg canvas directly, so the process-wide matplotlib backend is left alone. Writes no file
    when there is nothing numeric to plot.
    """
    series = _collect_series(read_metrics(metrics_jsonl_path))
    if not series:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    num_cols = min(4, len(series))
    num_rows = math.ceil(len(series) / num_cols)
    fig = Figure(figsize=(4 * num_cols, 3 * num_rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(num_rows, num_cols, squeeze=False).ravel()
    for ax, (base, by_split) in zip(axes, series.items()):
        for split, points in by_split.items():
            steps, values = zip(*points)
            style = dict(marker="o", linestyle="--", markersize=4) if split == "val" else dict(linewidth=1)
            ax.plot(steps, values, label=split or base, **style)
        ax.set_title(base)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(series):]:
        ax.set_visible(False)
    fig.savefig(png_path, dpi=100)


def _collect_series(records: list[dict]) -> dict[str, dict[str, list]]:
    """{base name: {split: [(step, value), ...]}} in order of first appearance; `train/loss` -> loss, train."""
    series = defaultdict(lambda: defaultdict(list))
    for record in records:
        step = record.get("step")
        for name, value in record.items():
            if name == "step" or not _is_number(value) or not _is_number(step):
                continue
            split, base = _split_name(name)
            series[base][split].append((step, value))
    return {base: dict(by_split) for base, by_split in series.items()}


def _split_name(name: str) -> tuple[str, str]:
    # Only a known split is a prefix: `train/rewards/chosen` (TRL-style name) -> ("train", "rewards/chosen").
    head, sep, rest = name.partition("/")
    return (head, rest) if sep and head in SPLITS else ("", name)


# ------------------------------------------------------------------------------------- progress bar
class ProgressBar:
    """A tqdm bar over optimiser steps with a compact postfix (e.g. `loss=0.6931, acc=0.5, tok/s=1.2e+04`)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        from tqdm import tqdm

        self._bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, file=sys.stderr,
                         unit="step", desc="train")

    def update(self, step: int, postfix: dict | None = None) -> None:
        """Move to absolute `step` and show `postfix` values with 4 significant digits (None skipped)."""
        if postfix:
            text = ", ".join(f"{k}={_fmt(v)}" for k, v in postfix.items() if v is not None)
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def _fmt(value) -> str:
    value = _to_python(value)
    return f"{value:.4g}" if _is_number(value) else str(value)
