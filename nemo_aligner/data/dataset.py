"""What every task's dataset shares: tokenisation settings, and rows read, parsed and tokenised up
front with every row counted in a RowReport.

Tokenising up front means bad rows fail at start-up (with file and line), the over-length policy is
applied and counted before the first step, and the lengths packing needs are known. A task's
dataset (`data.preference.dataset`, `data.sft.dataset`) subclasses TokenizedDataset and says how one
row becomes an example (`parse_row`) and how one example becomes tokens (`tokenize`).

A tokenised example has `num_tokens` (what it occupies in a pack), `num_labels` (scored tokens) and
`truncated`.
"""

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from nemo_aligner.data.blend import blend_order
from nemo_aligner.data.report import RowReport
from nemo_aligner.data.rows import BlendFiles, DataError, read_rows
from nemo_aligner.data.sources import source_files

OVERLENGTH_POLICIES = ("truncate", "drop", "error")


@dataclass
class TokenizeSettings:
    """model.data.* options that turn rendered text into token ids (shared by every task)."""

    seq_length: int  # max tokens of one sequence (prompt + response)
    overlength: str = "truncate"  # truncate | drop | error
    chat_template: str | None = None  # None = the tokenizer's own
    add_bos: bool | None = None  # None = when the tokenizer has a BOS token
    add_eos: bool = True  # append EOS to string responses

    def key(self) -> dict:
        return dataclasses.asdict(self)


def with_bos(ids: list, tokenizer, add_bos: bool | None) -> tuple[list, bool]:
    """(ids with BOS prepended unless already there, whether it was prepended); add_bos None = when defined."""
    add = add_bos if add_bos is not None else tokenizer.bos_id is not None
    if add and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        return [tokenizer.bos_id] + ids, True
    return ids, False


def with_eos(ids: list, eos_id: int) -> list:
    return ids if ids and ids[-1] == eos_id else ids + [eos_id]


class TokenizedDataset:
    """A list of tokenised examples plus the report of how the rows became them."""

    unit = "examples"  # what one example is called in messages and metric names
    pack_hint = "every example must fit in one pack: use a pack size >= model.data.seq_length"

    def __init__(self, examples: list, report: RowReport, fingerprint: str = ""):
        self.examples = examples
        self.report = report
        self.fingerprint = fingerprint  # identifies files + tokenisation (caches key on it)
        self.source_rows: np.ndarray | None = None  # [num_examples] row of each example, counted across files

    def __len__(self):
        return len(self.examples)

    def pack_lengths(self) -> np.ndarray:
        """Tokens each example occupies in a pack (the unit of packing)."""
        return np.array([e.num_tokens for e in self.examples], dtype=np.int64)

    def padded_row_length(self, index: int) -> int:
        """Tokens of the longest row example `index` becomes in the padded layout."""
        return self.examples[index].num_tokens

    @classmethod
    def read(cls, files, parse_row: Callable, tokenize: Callable, name: str,
             read_file: Callable = read_rows) -> tuple[list, RowReport, np.ndarray]:
        """(examples, report, source rows): every row of `files` parsed (`parse_row(row, location)`, the location
        "file:line" or "file:row N") and tokenised (`tokenize(example)`, None = dropped by the over-length policy).
        read_file(path, key) yields (location, row); a format whose example spans several rows yields one merged
        row per example. A BlendFiles (weights in model.data.data_prefix) is then blended (`data.blend`): the
        examples are its seeded draw, and the report holds each source's share."""
        files = _as_files(files)
        if not files:
            raise DataError(f"{name}: no data files given (model.data.data_prefix)")
        report = RowReport(files=files, unit=cls.unit)
        examples, source_rows, sizes, num_rows = [], [], [], []
        for file in files:
            first_example, first_row = len(examples), report.num_rows
            for where, row in read_file(file, name):
                example = parse_row(row, where)
                report.add_row(example.shape)
                tokenized = tokenize(example)
                if tokenized is None:
                    report.add_dropped(example.source)
                    continue
                report.add_kept(example.source, tokenized.num_tokens, tokenized.num_labels, tokenized.truncated)
                examples.append(tokenized)
                source_rows.append(report.num_rows - 1)
            sizes.append(len(examples) - first_example)
            num_rows.append(report.num_rows - first_row)
        if not examples:
            raise DataError(f"{name}: no usable {cls.unit} in {files} ({report.num_dropped} dropped as over-length)")
        source_rows = np.asarray(source_rows, dtype=np.int64)
        if isinstance(files, BlendFiles):
            order, report.blend = blend_order(sizes, files.weights, files.seed, files, num_rows, name)
            report.blend_seed = files.seed
            examples, source_rows = [examples[i] for i in order], source_rows[order]
        return examples, report, source_rows


def _as_files(files) -> list[str]:
    """The paths as strings; a BlendFiles keeps its weights and seed."""
    if isinstance(files, BlendFiles):
        return BlendFiles(files, files.weights, files.seed)
    return [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]


_FILE_DIGESTS: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: each file is read once per process


def file_digest(path) -> str:
    """sha256 of one data path's bytes (a folder: its shards' names and bytes, in reading order); remembered for
    the process, keyed by path, size and modification time."""
    if Path(path).is_dir():
        shards = source_files(path)
        return hashlib.sha256("\n".join(f"{s.name} {file_digest(s)}" for s in shards).encode()).hexdigest()
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def files_digest(files) -> str:
    """sha256 of the files' contents, in order, and of a blend's weights and seed (what a run's checkpoint records
    as its data)."""
    blend = f"\nblend {files.key()!r}" if isinstance(files, BlendFiles) else ""
    return hashlib.sha256(("\n".join(file_digest(f) for f in files) + blend).encode()).hexdigest()


def fingerprint_files(files, *parts) -> str:
    """sha256 of the files' contents and of `parts` (tokenizer fingerprint, settings, column names)."""
    return hashlib.sha256((files_digest(files) + repr(parts)).encode()).hexdigest()
