"""Reading data files into rows, shared by every task: jsonl and parquet files, and NeMo's
`model.data.data_prefix` mapping of splits to files.

A *row* is one JSON object (or parquet record) as the file holds it; each task's `rows.py` turns
rows into its example type. Errors name the file and line.
"""

import json
from pathlib import Path
from typing import Iterator


class DataError(ValueError):
    """A bad input row or file; the message names the file and line."""


def read_rows(path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, row dict) from a .jsonl or .parquet file; bad JSON names file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".parquet":
        yield from _read_parquet(path)
        return
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            yield line_no, row


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
