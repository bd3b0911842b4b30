"""RowReport: what reading a task's files did to every row, for the start-up message and the metrics.

Every row is counted: kept as it was, kept truncated, or dropped by the over-length policy
(`model.data.overlength`); the first few truncated and dropped rows are named by file:line. Nothing
is skipped silently. A blended split (weights in `model.data.data_prefix`) adds one line per source:
rows read, share requested and obtained, examples used (`data.blend`).
"""

from collections import Counter
from dataclasses import dataclass, field

NAMED_SOURCES = 5  # how many truncated / dropped rows the start-up message names


@dataclass
class RowReport:
    files: list[str]
    unit: str = "examples"  # what one example is called in messages and metric names ("pairs" for DPO)
    num_rows: int = 0
    num_examples: int = 0  # rows kept (truncated ones included)
    num_truncated: int = 0
    num_dropped: int = 0
    num_tokens: int = 0  # tokens of the kept examples
    num_labels: int = 0  # of which scored (response tokens)
    shapes: Counter = field(default_factory=Counter)  # row shape -> rows (which formats were found)
    truncated_sources: list[str] = field(default_factory=list)  # first few "file:line"
    dropped_sources: list[str] = field(default_factory=list)
    blend: list = field(default_factory=list)  # data.blend.SourceShare per source of a weighted split
    blend_seed: int | None = None

    def add_row(self, shape: str) -> None:
        self.num_rows += 1
        if shape:
            self.shapes[shape] += 1

    def add_dropped(self, source: str) -> None:
        self.num_dropped += 1
        _note(self.dropped_sources, source)

    def add_kept(self, source: str, num_tokens: int, num_labels: int, truncated: bool) -> None:
        self.num_examples += 1
        self.num_tokens += num_tokens
        self.num_labels += num_labels
        if truncated:
            self.num_truncated += 1
            _note(self.truncated_sources, source)

    def summary(self, name: str) -> str:
        shapes = f" ({', '.join(f'{k}: {v}' for k, v in sorted(self.shapes.items()))})" if self.shapes else ""
        text = (f"{name}: {self.num_examples} {self.unit} from {self.num_rows} rows in {len(self.files)} file(s)"
                f"{shapes}; {self.num_tokens:,} tokens, {self.num_labels:,} labelled; "
                f"truncated {self.num_truncated}, dropped {self.num_dropped} over-length")
        for what, sources in (("truncated", self.truncated_sources), ("dropped", self.dropped_sources)):
            if sources:
                text += f"\n  {what}: {', '.join(sources)}{' ...' if len(sources) == NAMED_SOURCES else ''}"
        if self.blend:
            used = sum(share.num_used for share in self.blend)
            text += (f"\n  blend of {len(self.blend)} sources (model.data.data_prefix weights, seed {self.blend_seed}): "
                     f"{used} {self.unit}, as many as the sources hold together")
            text += "".join(f"\n{share.line(self.unit)}" for share in self.blend)
        return text

    def metrics(self) -> dict:
        """The counts every training step logs (`data/truncated_pairs`, `data/dropped_examples`, ...)."""
        return {f"data/truncated_{self.unit}": self.num_truncated, f"data/dropped_{self.unit}": self.num_dropped}


def _note(sources: list, source: str) -> None:
    if len(sources) < NAMED_SOURCES:
        sources.append(source)
