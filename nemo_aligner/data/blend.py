"""NeMo-style weighted blending of a split's sources (`model.data.data_prefix.train: [0.7, a, 0.3, b]`),
applied to tokenised examples, so the row report and the over-length policy count every row first.

The rule (Megatron's BlendedDataset draws a fixed number of samples by weight, each source read
again when it is too small; ours fixes that number to the data's own size):
- the blend holds as many examples as its sources do together (N = sum of the examples each kept), so
  one epoch of a blend is as long as one epoch of the same files listed without weights;
- source i gets n_i = round(w_i * N) examples (largest remainder, so they sum to N), w_i its weight
  divided by the sum of the weights;
- a source with more than n_i examples gives a seeded sample of n_i of them, without replacement (the
  rest unused this run); one with fewer gives every example floor(n_i / c_i) times plus a seeded sample
  of the remainder (each example at most once more than any other);
- the sources are interleaved evenly (the j-th example of source i sits at (j + 1/2) / n_i of the way),
  so every stretch of the blend holds the requested shares (what trainer steps see with
  model.data.shuffle=false; with shuffling each epoch is a random order of the same blend).
The draw is a function of model.seed and the source's position (`numpy.random.default_rng([seed, i])`),
so the same config gives the same blend. Shapes: N blended examples, S sources.
"""

from dataclasses import dataclass

import numpy as np

from nemo_aligner.data.sources import DataError


@dataclass
class SourceShare:
    """What the blend did with one source, for the start-up report."""

    path: str
    num_rows: int  # rows read
    num_examples: int  # examples kept after tokenisation and the over-length policy
    requested: float  # weight / sum of weights
    num_used: int  # examples of the source in the blend
    obtained: float  # num_used / N

    def line(self, unit: str) -> str:
        return (f"  {self.path}: {self.num_rows} rows read, {self.num_examples} {unit}; share {self.requested:.3f} "
                f"requested, {self.obtained:.3f} obtained: {self.num_used} used ({self.how_used()})")

    def how_used(self) -> str:
        used, have = self.num_used, self.num_examples
        if used == have:
            return "each once"
        if used < have:
            return f"{have - used} unused"
        full, rest = divmod(used, have)
        return f"each {full}x" + (f", {rest} of them {full + 1}x" if rest else "")


def blend_counts(weights, total: int) -> np.ndarray:
    """[S] examples per source: round(w_i * total) by largest remainder, summing to `total`."""
    exact_S = np.asarray(weights, dtype=np.float64) * total
    counts_S = np.floor(exact_S).astype(np.int64)
    short = total - int(counts_S.sum())
    counts_S[np.argsort(-(exact_S - counts_S), kind="stable")[:short]] += 1
    return counts_S


def draw(num_have: int, num_wanted: int, rng) -> np.ndarray:
    """Indices into a source of `num_have` examples: every one floor(wanted / have) times, then a sample of the rest
    without replacement, in source order."""
    full, rest = divmod(num_wanted, num_have)
    sample = np.sort(rng.choice(num_have, size=rest, replace=False))
    return np.concatenate([np.tile(np.arange(num_have), full), sample]).astype(np.int64)


def blend_order(sizes, weights, seed: int, paths, num_rows, name: str) -> tuple[np.ndarray, list[SourceShare]]:
    """([N] indices into the sources' examples laid end to end, one SourceShare per source)."""
    assert seed is not None, "a blend needs its seed (split_files(..., seed=model.seed))"
    sizes_S = np.asarray(sizes, dtype=np.int64)
    total = int(sizes_S.sum())
    counts_S = blend_counts(weights, total)
    empty = [p for p, have, want in zip(paths, sizes_S, counts_S) if have == 0 and want > 0]
    if empty:
        raise DataError(f"{name}: {empty[0]} has no usable examples (empty, or every row dropped as over-length) but "
                        "a weight > 0 in the blend; remove it from model.data.data_prefix or give it weight 0")
    offsets_S = np.concatenate([[0], np.cumsum(sizes_S)[:-1]])
    picks, keys = [], []
    for i, (have, want) in enumerate(zip(sizes_S, counts_S)):
        if want == 0:
            continue
        picks.append(offsets_S[i] + draw(int(have), int(want), np.random.default_rng([seed, i])))
        keys.append((np.arange(want) + 0.5) / want)
    order_N = np.concatenate(picks)[np.argsort(np.concatenate(keys), kind="stable")]
    shares = [SourceShare(str(p), int(r), int(have), float(w), int(want), float(want) / total)
              for p, r, have, w, want in zip(paths, num_rows, sizes_S, weights, counts_S)]
    return order_N, shares
