"""Reading data files into rows, shared by every task: jsonl and parquet files, and NeMo's
`model.data.data_prefix` mapping of splits to files.

A *row* is one JSON object (or parquet record) as the file holds it; each task's `rows.py` turns
rows into its example type. Errors name the file and line (bad JSON, bytes that are not UTF-8) or the
config key (a file that is missing, a directory, unreadable); `check_data_files` runs the file checks
for every split at start-up, before anything is tokenised.
"""

import json
import os
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A bad input row or file; the message names the file and line."""


def check_file(path, key: str = "model.data.data_prefix") -> Path:
    """`path` is a readable file, or DataError naming the config key and what was expected."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{key}: {path} is a directory; expected a data file (.jsonl, .parquet, or a packed "
                        ".safetensors file); list the files themselves")
    if not path.is_file():
        raise DataError(f"{key}: {path}: data file not found")
    if not os.access(path, os.R_OK):
        raise DataError(f"{key}: {path}: data file not readable (permission denied)")
    return path


def check_data_files(data_prefix, splits=("train", "validation", "test")) -> None:
    """Every file of every split of model.data.data_prefix exists and is a readable file."""
    if data_prefix is None:
        return
    for split in splits:
        for file in split_files(data_prefix, split):
            check_file(file, f"model.data.data_prefix.{split}")


def read_rows(path, key: str = "model.data.data_prefix") -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from a .jsonl or .parquet file; bad JSON or non-UTF-8 bytes name file and
    line, a missing file or a directory the config key."""
    path = check_file(path, key)
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            line = _decode(raw, path, line_no)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is not part of the JSON
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                        "the line); save the file as UTF-8") from None


def _read_parquet(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs `pip install pyarrow`; or convert the file to jsonl") from None
    for row_no, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield row_no, row


def split_files(data_prefix, split: str) -> list[str]:
    """The files of one split of model.data.data_prefix, as NeMo writes it: {train: [...], validation: [...]}."""
    if not isinstance(data_prefix, dict):
        raise ValueError("model.data.data_prefix must be a mapping like {train: [file], validation: [file]}; "
                         f"got {data_prefix!r}")
    files = data_prefix.get(split)
    if files is None:
        return []
    files = [files] if isinstance(files, str) else list(files)
    for f in files:
        if not isinstance(f, str):
            raise ValueError(f"model.data.data_prefix.{split}: expected file paths, got {f!r} "
                             "(blending weights are not supported; list the files)")
    return files
