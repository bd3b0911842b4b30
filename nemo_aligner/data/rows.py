"""Reading data into rows, shared by every task, and NeMo's `model.data.data_prefix` mapping of splits
to data paths (with its blend weights).

A *row* is one JSON object (or parquet / arrow record) as the data holds it; each task's `rows.py`
turns rows into its example type. A data path is a jsonl file, gzip-compressed jsonl, a parquet or
arrow file, a Hugging Face `save_to_disk` folder or a folder of shards (`data.sources` says how each is
read). Errors name the file and line (`a.jsonl:12`) or row (`a.parquet:row 12`, `<folder>/<shard>:row 12`)
for bad rows, the config key for a path that is missing, unreadable or not data; `check_data_files`
runs the path checks for every split at start-up, before anything is tokenised.

A split may list its paths (`[a.jsonl, b.jsonl]`: read one after the other) or blend them as NeMo
does, weights and paths alternating (`[0.7, a.jsonl, 0.3, b.jsonl]`): `split_files` then returns a
`BlendFiles`, which `TokenizedDataset.read` samples by the weights (`data.blend`).
"""

import math
import os
from pathlib import Path
from typing import Iterator

from nemo_aligner.data.sources import DataError, folder_shards, is_table, iter_rows, require_pyarrow, resolve_split

__all__ = ["DataError", "BlendFiles", "check_file", "check_data_files", "read_rows", "split_files"]
BLEND_FORMAT = "[weight, path, weight, path, ...], e.g. [0.7, a.jsonl, 0.3, b.jsonl]"


class BlendFiles(list):
    """The paths of a split given with blend weights: a list of the paths (everything that checks, digests or
    names files sees paths), plus each path's share (the weights normalised to sum to 1) and the seed of the
    draw (model.seed). `key()` is what fingerprints and a run's identity record of the blend."""

    def __init__(self, files, weights, seed: int | None = None):
        super().__init__(str(f) for f in files)
        total = float(sum(weights))
        self.weights = tuple(float(w) / total for w in weights)
        self.seed = seed

    def key(self) -> dict:
        return {"weights": list(self.weights), "seed": self.seed}


def check_file(path, key: str = "model.data.data_prefix") -> Path:
    """`path` is readable data (a file, or a dataset / shard folder), or DataError naming the key and what was
    expected; pyarrow is checked here for the paths that need it."""
    path = Path(path)
    if path.is_dir():
        shards = folder_shards(path, key)
        unreadable = [s for s in shards if not os.access(s, os.R_OK)]
        if unreadable:
            raise DataError(f"{key}: {unreadable[0]}: data file not readable (permission denied)")
    elif not path.is_file():
        raise DataError(f"{key}: {path}: data file not found")
    elif not os.access(path, os.R_OK):
        raise DataError(f"{key}: {path}: data file not readable (permission denied)")
    if is_table(path):
        require_pyarrow(path)
    return path


def check_data_files(data_prefix, splits=("train", "validation", "test")) -> None:
    """Every path of every split of model.data.data_prefix exists and is readable data."""
    if data_prefix is None:
        return
    for split in splits:
        for file in split_files(data_prefix, split):
            check_file(file, f"model.data.data_prefix.{split}")


def read_rows(path, key: str = "model.data.data_prefix") -> Iterator[tuple[str, dict]]:
    """Yield (location, row dict) from any data path (`data.sources`): the location is `file:line` for jsonl,
    `file:row N` for parquet / arrow; bad JSON, non-UTF-8 bytes, corrupt gzip or a row that is not an object name
    it; a missing path or one that is not data names the config key."""
    path = check_file(path, key)
    for where, row in iter_rows(path, key):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        yield where, row


def split_files(data_prefix, split: str, seed: int | None = None) -> list[str]:
    """The paths of one split of model.data.data_prefix, as NeMo writes it: {train: [...], validation: [...]}; a
    DatasetDict folder stands for its sub-folder of `split`. Weights and paths alternating ([0.7, a, 0.3, b]) give
    a BlendFiles drawn with `seed` (model.seed)."""
    if not isinstance(data_prefix, dict):
        raise ValueError("model.data.data_prefix must be a mapping like {train: [file], validation: [file]}; "
                         f"got {data_prefix!r}")
    value = data_prefix.get(split)
    if value is None:
        return []
    key = f"model.data.data_prefix.{split}"
    entries = [value] if isinstance(value, str) else list(value)
    weights, files = parse_blend(entries, key)
    files = [resolve_split(f, split, key) for f in files]
    return files if weights is None else BlendFiles(files, weights, seed)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_blend(entries: list, key: str) -> tuple[list[float] | None, list[str]]:
    """(weights or None, paths) of a split's list: paths only, or NeMo's blend of weights and paths alternating."""
    if not entries or not _is_number(entries[0]):
        for entry in entries:
            if not isinstance(entry, str):
                raise ValueError(f"{key}={entries!r}: expected data paths, or weights and paths alternating "
                                 f"{BLEND_FORMAT}; {entry!r} is neither a path nor in a weight's place")
        return None, entries
    if len(entries) % 2:
        raise ValueError(f"{key}={entries!r}: a blend lists weights and paths alternating, {BLEND_FORMAT}; got an "
                         f"odd number of entries ({len(entries)})")
    weights, files = entries[0::2], entries[1::2]
    for k, (weight, file) in enumerate(zip(weights, files)):
        if not _is_number(weight) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{key}={entries!r}: entry {2 * k + 1} ({weight!r}) must be a weight, a finite number "
                             f">= 0; a blend is {BLEND_FORMAT}")
        if not isinstance(file, str):
            raise ValueError(f"{key}={entries!r}: entry {2 * k + 2} ({file!r}) must be a data path after its weight "
                             f"{weight}; a blend is {BLEND_FORMAT}")
    if sum(weights) <= 0:
        raise ValueError(f"{key}={entries!r}: the weights sum to 0; give at least one source a positive weight")
    return [float(w) for w in weights], files
