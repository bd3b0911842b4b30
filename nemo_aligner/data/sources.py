"""What a data path may be, and the rows each kind yields, with the location every error names.

- a jsonl file (any name; `.jsonl`, `.json`): one JSON object per line, located `file:line`;
- gzip-compressed jsonl (`.jsonl.gz`, `.json.gz`, or any file that starts with gzip's magic bytes), read
  streaming; corrupt or truncated gzip data is one DataError naming the file;
- a `.parquet` file, or an `.arrow` file (Arrow IPC stream, as Hugging Face `datasets` writes them, or the
  IPC file format / Feather v2), read a record batch at a time, located `file:row N` (N from 1);
- a folder written by `datasets.Dataset.save_to_disk` (`state.json` lists its `data-*.arrow` shards, in
  order), read with pyarrow alone (no `datasets` import), located `<folder>/<shard>:row N`;
- a folder written by `DatasetDict.save_to_disk` (`dataset_dict.json`, one sub-folder per split): the
  config's split picks the sub-folder (`resolve_split`, called by `rows.split_files`);
- any other folder: its `.parquet` / `.arrow` shards in sorted name order (shards named after several
  splits, `train-00000-of-00002.parquet` beside `test-00000-of-00001.parquet`, are refused rather than mixed).

Parquet and Arrow need pyarrow, the optional extra `nemo_aligner[parquet]`; without it the first such
path is one message naming it and the extra.
"""

import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Iterator

TABLE_SUFFIXES = (".parquet", ".arrow")
GZIP_MAGIC = b"\x1f\x8b"
ARROW_FILE_MAGIC = b"ARROW1"  # the IPC *file* format; save_to_disk writes the stream format (no magic)
DATASET_DICT = "dataset_dict.json"
DATASET_STATE = "state.json"
# config split -> the split names Hugging Face datasets use for it, in order of preference
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
HF_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}")  # datasets' / the Hub's shard names


class DataError(ValueError):
    """A bad input row or file; the message names the file and line (or row)."""


def is_table(path: Path) -> bool:
    """Read with pyarrow: a parquet / arrow file or a folder of them."""
    return path.is_dir() or path.suffix in TABLE_SUFFIXES


def require_pyarrow(path):
    """The pyarrow module, or DataError naming `path` and the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError(f"{path}: reading parquet / arrow data (and Hugging Face save_to_disk folders) needs pyarrow: "
                        "`pip install nemo_aligner[parquet]` (or `pip install pyarrow`); or convert the data to "
                        "jsonl") from None
    return pyarrow


# ------------------------------------------------------------------------------------- folders
def dataset_dict_splits(folder: Path) -> list[str]:
    """The split names of a DatasetDict.save_to_disk folder (its dataset_dict.json, else its sub-folders)."""
    try:
        splits = json.loads((folder / DATASET_DICT).read_text()).get("splits")
    except (OSError, ValueError, AttributeError):
        splits = None
    if not isinstance(splits, list):
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return [str(s) for s in splits]


def resolve_split(path: str, split: str, key: str) -> str:
    """`path`, or for a DatasetDict folder the sub-folder of `split` (validation also matches valid / val / dev);
    a DatasetDict without that split is a DataError naming the splits it has."""
    folder = Path(path)
    if not (folder / DATASET_DICT).is_file():
        return path
    splits = dataset_dict_splits(folder)
    for name in SPLIT_NAMES.get(split, (split,)):
        if name in splits and (folder / name).is_dir():
            return str(folder / name)
    names = SPLIT_NAMES.get(split, (split,))
    raise DataError(f"{key}: {folder} is a Hugging Face DatasetDict with splits {splits}, none of them "
                    f"{' / '.join(repr(n) for n in names)}; name the split's folder instead, e.g. "
                    f"{folder / splits[0] if splits else folder}")


def folder_shards(folder: Path, key: str) -> list[Path]:
    """The data files a folder stands for, in reading order (see the module docstring)."""
    if (folder / DATASET_DICT).is_file():
        raise DataError(f"{key}: {folder} is a Hugging Face DatasetDict with splits {dataset_dict_splits(folder)}; "
                        f"name one split's folder (e.g. {folder}/train)")
    if (folder / DATASET_STATE).is_file():
        return _saved_dataset_shards(folder)
    shards = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in TABLE_SUFFIXES
                    and not p.name.startswith("."))
    if not shards:
        raise DataError(f"{key}: {folder} is a directory without data: expected a Hugging Face dataset folder "
                        "(Dataset.save_to_disk: state.json + data-*.arrow), a DatasetDict folder (dataset_dict.json), "
                        "or a folder of .parquet / .arrow shards; or list data files (.jsonl, .jsonl.gz, .parquet)")
    _check_one_split(folder, shards, key)
    return shards


def _saved_dataset_shards(folder: Path) -> list[Path]:
    state = folder / DATASET_STATE
    try:
        names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state}: not a datasets state.json (expected a '_data_files' list of "
                        f"{{\"filename\": ...}}; {type(err).__name__}: {err})") from None
    shards = [folder / name for name in names]
    missing = [s.name for s in shards if not s.is_file()]
    if missing or not shards:
        raise DataError(f"{folder}: state.json lists shards {names} but {missing or 'none'} "
                        f"{'are' if missing else 'is'} missing; save the dataset again (save_to_disk)")
    return shards


def _check_one_split(folder: Path, shards: list[Path], key: str) -> None:
    groups = sorted({m["split"] for s in shards if (m := HF_SHARD.match(s.name))})
    if len(groups) > 1:
        raise DataError(f"{key}: {folder} holds shards of several splits {groups} (named <split>-NNNNN-of-NNNNN); "
                        "reading them all would mix the splits: list the shard files of one split, or keep one "
                        "split per folder")


def source_files(path) -> list[Path]:
    """The files whose bytes make up a data path (its shards, for a folder): what a fingerprint digests."""
    path = Path(path)
    return folder_shards(path, str(path)) if path.is_dir() else [path]


# ------------------------------------------------------------------------------------------ rows
def iter_rows(path: Path, key: str) -> Iterator[tuple[str, object]]:
    """(location, parsed row before the dict check) of any data path; see the module docstring."""
    if path.is_dir():
        require_pyarrow(path)
        for shard in folder_shards(path, key):
            yield from table_rows(shard)
    elif path.suffix in TABLE_SUFFIXES:
        yield from table_rows(path)
    else:
        yield from jsonl_rows(path)


def jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    for line_no, raw in _lines(path):
        line = _decode(raw, path, line_no)
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{line_no}: malformed JSON ({err.msg} at column {err.colno})") from None


def is_gzip(path: Path) -> bool:
    """By gzip's magic bytes (so gzip data under a .jsonl name is read too); a .gz name without them is an error."""
    with path.open("rb") as f:
        magic = f.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    if path.suffix == ".gz" and not magic:
        raise DataError(f"{path}: not a gzip file (it does not start with gzip's magic bytes); a plain jsonl file "
                        "should not be named .gz")
    return magic


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not is_gzip(path):
        with path.open("rb") as f:
            yield from enumerate(f, start=1)
        return
    line_no = 0
    try:
        with gzip.open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut file ends in EOFError
        where = f"after line {line_no}" if line_no else "before the first line"
        raise DataError(f"{path}: gzip data corrupt or cut {where} ({err}); compress it again (`gzip -t "
                        f"{path.name}` checks a file)") from None


def _decode(raw: bytes, path: Path, line_no: int) -> str:
    try:
        return raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a byte-order mark is not part of the JSON
    except UnicodeDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of "
                        "the line); save the file as UTF-8") from None


def table_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """Rows of one parquet / arrow file, a record batch at a time."""
    pa = require_pyarrow(path)
    row_no = 0
    try:
        for batch in _record_batches(pa, path):
            for row in batch.to_pylist():
                row_no += 1
                yield f"{path}:row {row_no}", row
    except (pa.ArrowException, OSError) as err:
        kind = "parquet" if path.suffix == ".parquet" else "Arrow IPC"
        raise DataError(f"{path}: not a readable {kind} file after row {row_no} ({err})") from None


def _record_batches(pa, path: Path):
    if path.suffix == ".parquet":
        yield from pa.parquet.ParquetFile(path).iter_batches(batch_size=1024)
        return
    with open(path, "rb") as f:
        is_file_format = f.read(len(ARROW_FILE_MAGIC)) == ARROW_FILE_MAGIC
    with pa.memory_map(str(path)) as source:
        if is_file_format:
            reader = pa.ipc.open_file(source)
            for k in range(reader.num_record_batches):
                yield reader.get_batch(k)
        else:
            yield from pa.ipc.open_stream(source)


def span(first: str, last: str) -> str:
    """One location for two consecutive rows: `a.jsonl:3-4`, `a.parquet:row 3-4`."""
    head, _, start = first.rpartition(":")
    last_head, _, end = last.rpartition(":")
    if head != last_head:
        return f"{first} + {last}"
    return f"{head}:{start}-{end.rsplit(' ', 1)[-1]}"
