"""Packed preference data: whole chosen+rejected pairs grouped into packs of `pack_size` tokens, in
memory (`PackedPreferenceDataset`; packing itself: `data.layout.pack_examples`) and on disk (`write_packed_file`, `read_packed_file`).

A packed dataset is an ordinary PreferenceDataset (the pairs) plus `packs`, lists of pair indices;
the training loop samples packs and `collate_pairs(..., packed=True)` lays each pack out as one row,
so everything after loading is shared with unpacked data.

File format (safetensors, so reading never unpickles anything; format "nemo_aligner.packed_dpo",
version 1). prepare_packed_dpo_dataset.py writes one file per pack size and split, named
`packed_{pack_size}_seed{seed}.{split}.safetensors`. Pairs are stored pack by pack, so the tokens of
pack j are one contiguous slice of `input_ids`, exactly the row the collate feeds the model.
  input_ids       int32   [N]       all sequences back to back: per pair, prompt+chosen then prompt+rejected
  seq_offsets     int64   [2P + 1]  sequence s is input_ids[seq_offsets[s]:seq_offsets[s + 1]]
                                    (2k = chosen, 2k + 1 = rejected of pair k)
  prompt_lengths  int32   [2P]      prompt tokens at the start of each sequence (labels -100 there)
  pack_offsets    int64   [K + 1]   pack j holds pairs pack_offsets[j]:pack_offsets[j + 1]
  rewards         float32 [P, 2]    [Rc, Rr]: the row's values, else the default rewards given when packing
  rewards_given   uint8   [P, 2]    1 where the row had the reward itself
  truncated       uint8   [P]       1 where the over-length policy cut the pair
  source_rows     int64   [P]       0-based row of each pair, counted across the source files in order
The safetensors metadata holds one key, "nemo_aligner", a JSON object with the format and version,
tokenizer fingerprint, pack size, algorithm, seed, seq_length, counts and the source files.
Shapes: N tokens, P pairs, K packs. Packing in memory: `data.layout.pack_examples`.
"""

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from nemo_aligner.data.dataset import file_digest
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.tokenize import TokenizedPair
from nemo_aligner.data.report import RowReport

log = logging.getLogger(__name__)

FORMAT = "nemo_aligner.packed_dpo"
FORMAT_VERSION = 1
METADATA_KEY = "nemo_aligner"
TENSORS = {"input_ids": np.int32, "seq_offsets": np.int64, "prompt_lengths": np.int32, "pack_offsets": np.int64,
           "rewards": np.float32, "rewards_given": np.uint8, "truncated": np.uint8, "source_rows": np.int64}


def packed_file_name(pack_size: int, seed: int, split: str) -> str:
    return f"packed_{pack_size}_seed{seed}.{split}.safetensors"


class PackedPreferenceDataset(PreferenceDataset):
    """Pairs plus the packs they are grouped into (lists of pair indices)."""

    def __init__(self, pairs, report, packs: list[list[int]], pack_size: int, default_rewards=(1.0, 0.0),
                 fingerprint: str = "", metadata: dict | None = None):
        super().__init__(pairs, report, default_rewards, fingerprint)
        self.packs = packs
        self.pack_size = pack_size
        self.metadata = metadata or {}


def check_pack_size(pack_size: int, seq_length: int, key: str = "pack_size") -> None:
    """NeMo's rule: a pack must hold a pair of two max-length sequences, so pack_size >= 2 x seq_length."""
    if isinstance(pack_size, bool) or not isinstance(pack_size, (int, np.integer)) or pack_size <= 0:
        raise ValueError(f"{key}={pack_size!r}; expected a positive integer")
    if pack_size < 2 * seq_length:
        raise ValueError(f"{key}={pack_size} < 2 x seq_length ({seq_length}, from model.data.seq_length or "
                         f"model.encoder_seq_length): a pair of two {seq_length}-token sequences must fit in one "
                         f"pack; use a pack size >= {2 * seq_length} or lower the sequence length")


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def packed_arrays(dataset: PreferenceDataset, packs) -> dict[str, np.ndarray]:
    """The file's tensors for `dataset` grouped into `packs` (pairs re-ordered pack by pack)."""
    order = [index for p in packs for index in p]
    if sorted(order) != list(range(len(dataset))):
        raise ValueError(f"packs must hold every pair of the dataset exactly once ({len(dataset)} pairs, "
                         f"{len(order)} placed, {len(set(order))} distinct)")
    sequences, prompt_lengths = [], []
    for index in order:
        pair = dataset.pairs[index]
        sequences += [pair.prompt, pair.chosen, pair.prompt, pair.rejected]
        prompt_lengths += [len(pair.prompt), len(pair.prompt)]
    seq_lengths = [len(pair.prompt) + len(getattr(pair, which))
                   for pair in (dataset.pairs[i] for i in order) for which in ("chosen", "rejected")]
    given = [(p.chosen_reward is not None, p.rejected_reward is not None) for p in (dataset.pairs[i] for i in order)]
    rows = dataset.source_rows if dataset.source_rows is not None else np.full(len(dataset), -1, np.int64)
    arrays = {
        "input_ids": np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32),
        "seq_offsets": np.concatenate([[0], np.cumsum(seq_lengths, dtype=np.int64)]),
        "prompt_lengths": np.asarray(prompt_lengths, dtype=np.int32),
        "pack_offsets": np.concatenate([[0], np.cumsum([len(p) for p in packs], dtype=np.int64)]),
        "rewards": np.array([dataset.rewards(i) for i in order], dtype=np.float32).reshape(-1, 2),
        "rewards_given": np.array(given, dtype=np.uint8).reshape(-1, 2),
        "truncated": np.array([dataset.pairs[i].truncated for i in order], dtype=np.uint8),
        "source_rows": np.asarray(rows, dtype=np.int64)[order] if order else np.zeros(0, np.int64),
    }
    return {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, dtype in TENSORS.items()}


def write_packed_file(path, dataset: PreferenceDataset, packs, *, pack_size: int, algorithm: str, seed: int,
                      seq_length: int, tokenizer_fingerprint: str, extra: dict | None = None) -> dict:
    """Write `dataset` grouped into `packs`; returns the metadata written. The file appears complete or not at all."""
    path = Path(path)
    arrays = packed_arrays(dataset, packs)
    tokens_per_pack = _pack_token_counts(arrays)
    if tokens_per_pack.size and tokens_per_pack.max() > pack_size:
        raise ValueError(f"{path}: a pack holds {tokens_per_pack.max()} tokens > pack_size={pack_size}")
    report = dataset.report
    metadata = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer_fingerprint,
        "pack_size": int(pack_size), "algorithm": algorithm, "seed": int(seed), "seq_length": int(seq_length),
        "num_packs": len(packs), "num_pairs": len(dataset), "num_tokens": int(arrays["input_ids"].size),
        "num_rows": report.num_rows, "num_truncated": report.num_truncated, "num_dropped": report.num_dropped,
        "source_files": [str(f) for f in report.files], "default_rewards": list(dataset.default_rewards),
        **(extra or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates 0600; shared datasets should read like any file
    os.replace(tmp, path)
    return metadata


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pack_token_counts(arrays) -> np.ndarray:
    seq_starts = arrays["seq_offsets"][2 * arrays["pack_offsets"]]
    return np.diff(seq_starts)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class PackedFile:
    path: Path
    arrays: dict[str, np.ndarray]
    metadata: dict

    @property
    def pack_size(self) -> int:
        return self.metadata["pack_size"]

    @property
    def num_pairs(self) -> int:
        return len(self.arrays["truncated"])

    def pairs(self) -> list[TokenizedPair]:
        """The pairs in file order (pack by pack), exactly as they were tokenised."""
        a = self.arrays
        ids, offsets, prompt_lengths = a["input_ids"], a["seq_offsets"].tolist(), a["prompt_lengths"].tolist()
        rewards, given, truncated = a["rewards"].tolist(), a["rewards_given"].tolist(), a["truncated"].tolist()
        pairs = []
        for k in range(self.num_pairs):
            c0, c1, r1 = offsets[2 * k], offsets[2 * k + 1], offsets[2 * k + 2]
            p = prompt_lengths[2 * k]
            prompt = ids[c0:c0 + p]
            if prompt_lengths[2 * k + 1] != p or not np.array_equal(ids[c1:c1 + p], prompt):
                raise ValueError(f"{self.path}: pair {k}: chosen and rejected do not share their prompt; "
                                 "the file is corrupt")
            pairs.append(TokenizedPair(
                prompt=prompt, chosen=ids[c0 + p:c1], rejected=ids[c1 + p:r1],
                chosen_reward=rewards[k][0] if given[k][0] else None,
                rejected_reward=rewards[k][1] if given[k][1] else None, truncated=bool(truncated[k])))
        return pairs

    def packs(self, first_pair: int = 0) -> list[list[int]]:
        bounds = (self.arrays["pack_offsets"] + first_pair).tolist()
        return [list(range(start, end)) for start, end in zip(bounds[:-1], bounds[1:])]


def read_packed_file(path) -> PackedFile:
    """Read and check a packed file (safetensors: no pickle). Errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: packed data file not found")
    if path.suffix == ".npy":
        raise ValueError(f"{path}: NeMo-Aligner's .npy packed files are pickled object arrays and are not loaded "
                         "(unpickling can run code); re-pack the jsonl data with "
                         "examples/nlp/data/dpo/prepare_packed_dpo_dataset.py")
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a packed data file from prepare_packed_dpo_dataset.py "
                         f"(cannot read it as safetensors: {err})") from None
    if METADATA_KEY not in header:
        raise ValueError(f"{path}: safetensors file without '{METADATA_KEY}' metadata; not a packed data file "
                         "from prepare_packed_dpo_dataset.py")
    try:
        metadata = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: unreadable '{METADATA_KEY}' metadata ({err}); the file is corrupt") from None
    if metadata.get("format") != FORMAT or metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: format {metadata.get('format')!r} version {metadata.get('format_version')}; "
                         f"this version reads {FORMAT!r} up to version {FORMAT_VERSION}")
    _check_arrays(path, arrays, metadata)
    return PackedFile(path, arrays, metadata)


def _check_arrays(path, a, metadata):
    missing = sorted(set(TENSORS) - set(a))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    for name, dtype in TENSORS.items():
        if a[name].dtype != dtype:
            raise ValueError(f"{path}: tensor {name} has dtype {a[name].dtype}, expected {np.dtype(dtype)}")
    num_pairs, num_packs = len(a["truncated"]), len(a["pack_offsets"]) - 1
    ok = (num_pairs == metadata.get("num_pairs") and num_packs == metadata.get("num_packs")
          and a["seq_offsets"].shape == (2 * num_pairs + 1,) and a["prompt_lengths"].shape == (2 * num_pairs,)
          and a["rewards"].shape == a["rewards_given"].shape == (num_pairs, 2)
          and a["source_rows"].shape == (num_pairs,)
          and a["seq_offsets"][0] == 0 and a["seq_offsets"][-1] == a["input_ids"].size
          and np.all(np.diff(a["seq_offsets"]) > a["prompt_lengths"]) and np.all(a["prompt_lengths"] > 0)
          and a["pack_offsets"][0] == 0 and a["pack_offsets"][-1] == num_pairs
          and np.all(np.diff(a["pack_offsets"]) > 0))
    if not ok:
        raise ValueError(f"{path}: inconsistent offsets or shapes ({num_pairs} pairs, {num_packs} packs); "
                         "the file is corrupt or was not written by prepare_packed_dpo_dataset.py")
    if num_packs and _pack_token_counts(a).max() > metadata["pack_size"]:
        raise ValueError(f"{path}: a pack holds more than pack_size={metadata['pack_size']} tokens; the file is corrupt")


def load_packed_dataset(files, *, tokenizer_fingerprint: str, max_pack_size: int, default_rewards=(1.0, 0.0),
                        name: str = "data", vocab_size: int | None = None) -> PackedPreferenceDataset:
    """One PackedPreferenceDataset from one or more packed files (made with the same tokenizer).

    `max_pack_size` is model.encoder_seq_length: a longer pack would not fit the model's sequence.
    `vocab_size`: the tokenizer's; a token id outside it (a corrupt or foreign file) is an error naming the
    file and the pair, at load time rather than as an IndexError inside the model.
    """
    if getattr(files, "weights", None) is not None:  # a BlendFiles: packs hold whole examples already drawn
        raise ValueError(f"{name}: blend weights with model.data.data_impl=packed_jsonl; blend when packing "
                         "(prepare_packed_dpo_dataset.py reads the same weighted model.data.data_prefix) and list the "
                         "packed file without weights")
    files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
    if not files:
        raise ValueError(f"{name}: no packed data files given (model.data.data_prefix)")
    report = RowReport(files=files, unit="pairs")
    pairs, packs, pack_sizes, metadata = [], [], [], []
    digest = hashlib.sha256(tokenizer_fingerprint.encode())
    for file in files:
        packed = read_packed_file(file)
        if vocab_size is not None:
            check_token_ids(packed, vocab_size)
        meta = packed.metadata
        if meta["tokenizer_fingerprint"] != tokenizer_fingerprint:
            raise ValueError(f"{file}: packed with another tokenizer (fingerprint {meta['tokenizer_fingerprint'][:16]}"
                             f"...) than the one training uses (fingerprint {tokenizer_fingerprint[:16]}...); token "
                             "ids would mean different text. Re-run prepare_packed_dpo_dataset.py with "
                             "+tokenizer_path set to the training tokenizer (model.tokenizer.path or the checkpoint)")
        if packed.pack_size > max_pack_size:
            raise ValueError(f"{file}: pack_size={packed.pack_size} > model.encoder_seq_length={max_pack_size}; "
                             f"with packed data set model.encoder_seq_length={packed.pack_size} (the pack size), "
                             "or use a file packed to at most the configured length")
        packs += packed.packs(first_pair=len(pairs))
        pairs += packed.pairs()
        pack_sizes.append(packed.pack_size)
        metadata.append(meta)
        report.num_rows += meta["num_rows"]
        report.num_truncated += meta["num_truncated"]
        report.num_dropped += meta["num_dropped"]
        digest.update(file_digest(file).encode())
        if list(meta.get("default_rewards", default_rewards)) != list(default_rewards):
            log.info("%s: packed with default rewards %s; rows without rewards now use model.data.default_*_reward "
                     "= %s", file, meta.get("default_rewards"), list(default_rewards))
    report.num_examples = len(pairs)
    report.num_tokens = sum(p.num_tokens for p in pairs)
    report.num_labels = sum(p.num_labels for p in pairs)
    return PackedPreferenceDataset(pairs, report, packs, max(pack_sizes), default_rewards, digest.hexdigest(),
                                   metadata={"files": metadata})


def check_token_ids(packed: PackedFile, vocab_size: int) -> None:
    """Every token id of a packed file is in [0, vocab_size)."""
    ids = packed.arrays["input_ids"]
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if not bad.size:
        return
    position = int(bad[0])
    sequence = int(np.searchsorted(packed.arrays["seq_offsets"], position, side="right")) - 1
    pair = sequence // 2
    row = int(packed.arrays["source_rows"][pair])
    raise ValueError(f"{packed.path}: pair {pair} (source row {row + 1 if row >= 0 else '?'}) holds token id "
                     f"{int(ids[position])}, outside the tokenizer's vocabulary of {vocab_size} ({bad.size} such "
                     "tokens in the file); the file is corrupt or was packed with another tokenizer: pack the data "
                     "again with examples/nlp/data/dpo/prepare_packed_dpo_dataset.py")
