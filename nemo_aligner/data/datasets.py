"""PreferenceDataset: every row of the given files read, normalised and tokenised up front.

Tokenising up front means bad rows fail at start-up (with file and line), the over-length policy
is applied and counted before the first step, and the lengths needed for packing are known.
Reference log-probs, when precomputed, are stored beside the pairs (`ref_chosen`, `ref_rejected`).
"""

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nemo_aligner.data.formats import DataError, KeyMap, read_preference_file
from nemo_aligner.data.tokenize import TokenizedPair, TokenizeSettings, tokenize_example

log = logging.getLogger(__name__)


@dataclass
class DatasetReport:
    files: list[str]
    num_rows: int = 0
    num_pairs: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    truncated_sources: list[str] = field(default_factory=list)  # first few, for the start-up message
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        text = (f"{name}: {self.num_pairs} pairs from {self.num_rows} rows in {len(self.files)} file(s); "
                f"truncated {self.num_truncated}, dropped {self.num_dropped} over-length")
        return text + affected_rows_text(self.truncated_sources, self.dropped_sources)


def affected_rows_text(truncated_sources: list[str], dropped_sources: list[str]) -> str:
    """Start-up report lines naming the first few truncated / dropped rows (file:line)."""
    text = ""
    for what, sources in (("truncated", truncated_sources), ("dropped", dropped_sources)):
        if sources:
            text += f"\n  {what}: {', '.join(sources)}{' ...' if len(sources) == 5 else ''}"
    return text


class PreferenceDataset:
    def __init__(self, pairs: list[TokenizedPair], report: DatasetReport, default_rewards=(1.0, 0.0),
                 fingerprint: str = ""):
        self.pairs = pairs
        self.report = report
        self.default_rewards = default_rewards
        self.fingerprint = fingerprint  # identifies files + tokenisation, for the reference cache
        self.ref_chosen: np.ndarray | None = None  # precomputed reference log-probs [num_pairs]
        self.ref_rejected: np.ndarray | None = None
        self.source_rows: np.ndarray | None = None  # [num_pairs] row of each pair, counted across the files

    def __len__(self):
        return len(self.pairs)

    def rewards(self, index: int) -> tuple[float, float]:
        pair = self.pairs[index]
        chosen = pair.chosen_reward if pair.chosen_reward is not None else self.default_rewards[0]
        rejected = pair.rejected_reward if pair.rejected_reward is not None else self.default_rewards[1]
        return chosen, rejected

    def pair_lengths(self) -> np.ndarray:
        """Tokens per pair (chosen + rejected sequences), the unit of packing."""
        return np.array([p.num_tokens for p in self.pairs], dtype=np.int64)

    @classmethod
    def from_files(cls, files, tokenizer, settings: TokenizeSettings, keys: KeyMap = KeyMap(),
                   default_rewards=(1.0, 0.0), name: str = "data") -> "PreferenceDataset":
        files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not files:
            raise DataError(f"{name}: no data files given (model.data.data_prefix)")
        report = DatasetReport(files=files)
        pairs, source_rows = [], []
        for file in files:
            for example in read_preference_file(file, keys):
                report.num_rows += 1
                pair = tokenize_example(example, tokenizer, settings)
                if pair is None:
                    report.num_dropped += 1
                    note_source(report.dropped_sources, example.source)
                    continue
                if pair.truncated:
                    report.num_truncated += 1
                    note_source(report.truncated_sources, example.source)
                pairs.append(pair)
                source_rows.append(report.num_rows - 1)
        report.num_pairs = len(pairs)
        if not pairs:
            raise DataError(f"{name}: no usable pairs in {files} ({report.num_dropped} dropped as over-length)")
        fingerprint = _fingerprint(files, tokenizer, settings, keys)
        dataset = cls(pairs, report, default_rewards, fingerprint)
        dataset.source_rows = np.asarray(source_rows, dtype=np.int64)
        return dataset


def note_source(sources: list, source: str, limit: int = 5):
    if len(sources) < limit:
        sources.append(source)


def _fingerprint(files, tokenizer, settings, keys) -> str:
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    digest.update(repr((tokenizer.fingerprint(), settings.key(), keys.__dict__)).encode())
    return digest.hexdigest()
