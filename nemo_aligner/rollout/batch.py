"""The rollout batch of online RL and its collation into training rows.

A rollout is one step's completions on this data-parallel rank: for each, the prompt and completion token
ids, the sampler's log-probs, optional old (rollout-policy) and reference log-probs, the reward, the
advantage and the prompt row's columns. `RolloutDataset` holds them as a `TokenizedDataset` of
`RolloutExample`s (ids = prompt + completion, label mask on the completion), so the offline path's
collation (`data.batch.layout_rows`) lays them out padded or packed, and `collate_rollout` adds the
per-completion fields a policy loss reads.

Per-token values (old / reference log-probs) are kept per completion as [L] arrays, L = its completion
tokens, and collated into [S, L_max] beside a mask; `per_sequence` turns a head's dense [R, T] output
into the same [S, L_max] layout, so losses see completions, never rows.

Shapes: R rows, T tokens per row, S completions (sequences) in the micro-batch, L completion tokens.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from nemo_aligner.data.batch import IGNORE_INDEX, Batch, layout_rows
from nemo_aligner.data.dataset import TokenizedDataset
from nemo_aligner.data.report import RowReport


@dataclass
class RolloutExample:
    """One completion of one prompt, and everything the rollout computed about it."""

    prompt_ids: np.ndarray  # [P]
    completion_ids: np.ndarray  # [L] (the EOS that ended it included)
    prompt: Any  # the row's prompt (string or messages)
    text: str  # the completion decoded
    columns: dict  # the prompt row's other columns
    prompt_index: int  # position of the prompt in the step's global batch (groups: consecutive, same index)
    sample_index: int  # which of the group's completions
    truncated: bool  # hit max_completion_length without an EOS / stop
    sampler_logps: np.ndarray  # [L] the engine's log-probs at the sampling temperature
    old_logps: np.ndarray | None = None  # [L] the rollout policy's (recomputed), when num_iterations > 1
    ref_logps: np.ndarray | None = None  # [L] the reference policy's, when the loss has a KL term
    reward: float = float("nan")
    advantage: float = 0.0
    extra: dict = field(default_factory=dict)  # algorithm-specific per-completion values (PPO: values, ...)

    @property
    def ids(self) -> np.ndarray:
        return np.concatenate([self.prompt_ids, self.completion_ids])

    @property
    def label_mask(self) -> np.ndarray:
        """[P + L]: token i is a target where set (the completion's tokens)."""
        mask = np.zeros(len(self.prompt_ids) + len(self.completion_ids), dtype=bool)
        mask[len(self.prompt_ids):] = True
        return mask

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def num_labels(self) -> int:
        return len(self.completion_ids)


class RolloutDataset(TokenizedDataset):
    """One step's completions on this rank (not read from files)."""

    unit = "completions"

    def __init__(self, examples: list[RolloutExample]):
        super().__init__(examples, RowReport(files=[], unit=self.unit))

    def values(self, name: str) -> np.ndarray:
        return np.array([getattr(e, name) for e in self.examples])

    def set_per_token(self, name: str, indices, values_SL: torch.Tensor) -> None:
        """Store per-token values [S, L_max] (per_sequence layout) as each completion's [L] array."""
        values = values_SL.detach().float().cpu().numpy()
        for s, i in enumerate(indices):
            example = self.examples[int(i)]
            setattr(example, name, values[s, :example.num_labels].copy())


@dataclass(kw_only=True)
class RolloutBatch(Batch):
    advantages_S: torch.Tensor  # [S]
    truncated_S: torch.Tensor  # [S] bool
    rewards_S: torch.Tensor  # [S]
    old_logps_SL: torch.Tensor | None = None  # [S, L_max]
    ref_logps_SL: torch.Tensor | None = None  # [S, L_max]
    rollout: Any = None  # the RolloutDataset the batch came from (to store per-token values into)

    @property
    def num_sequences(self) -> int:
        return self.num_examples


def pack_in_order(lengths: list[int], pack_size: int) -> list[list[int]]:
    """Positions grouped into rows of <= pack_size tokens, first fit in order (deterministic; a longer
    sequence gets a row of its own)."""
    rows, used = [], []
    for i, n in enumerate(lengths):
        for r, total in enumerate(used):
            if total + n <= pack_size:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def _per_token(examples, name: str) -> torch.Tensor | None:
    arrays = [getattr(e, name) for e in examples]
    if any(a is None for a in arrays):
        return None
    out = torch.zeros(len(arrays), max(len(a) for a in arrays), dtype=torch.float32)
    for s, a in enumerate(arrays):
        out[s, :len(a)] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out


def collate_rollout(dataset: RolloutDataset, items: list[int], pad_id: int, packed: bool = False,
                    pack_size: int | None = None) -> RolloutBatch:
    """items: completion indices of the rollout. Padded: one completion per row; packed: the micro-batch's
    completions packed into rows of <= pack_size tokens (block-diagonal attention). Sequence s is items[s]
    either way (rows keep the items' order)."""
    examples = [dataset.examples[i] for i in items]
    if packed:
        size = pack_size or max(e.num_tokens for e in examples)
        rows = pack_in_order([e.num_tokens for e in examples], size)
    else:
        rows = [[s] for s in range(len(examples))]
    order = [s for row in rows for s in row]
    sequences = [[(examples[s].ids, examples[s].label_mask) for s in row] for row in rows]
    ordered = [examples[s] for s in order]
    return RolloutBatch(
        **layout_rows(sequences, pad_id, packed),
        example_indices=torch.as_tensor([items[s] for s in order], dtype=torch.long),
        advantages_S=torch.tensor([e.advantage for e in ordered], dtype=torch.float32),
        truncated_S=torch.tensor([e.truncated for e in ordered], dtype=torch.bool),
        rewards_S=torch.tensor([e.reward for e in ordered], dtype=torch.float32),
        old_logps_SL=_per_token(ordered, "old_logps"), ref_logps_SL=_per_token(ordered, "ref_logps"),
        rollout=dataset)


def per_sequence(values_RT: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [S, L_max] of each sequence's scored positions in order, mask [S, L_max] bool) from a dense
    [R, T] (or [R, T, K] -> [S, L_max, K]) head output, for padded and packed rows alike. Differentiable."""
    scored_RT = batch.labels != IGNORE_INDEX
    values_N = values_RT[scored_RT]
    seq_N = batch.seq_index[scored_RT]
    num_sequences = batch.num_examples
    counts_S = torch.bincount(seq_N, minlength=num_sequences)
    starts_S = torch.cumsum(counts_S, 0) - counts_S
    # layout_rows numbers sequences in order of appearance and keeps each one's targets contiguous
    pos_N = torch.arange(seq_N.numel(), device=seq_N.device) - starts_S[seq_N]
    width = int(counts_S.max()) if num_sequences else 0
    out = values_N.new_zeros(num_sequences, width, *values_N.shape[1:])
    out = out.index_put((seq_N, pos_N), values_N)
    mask_SL = torch.zeros(num_sequences, width, dtype=torch.bool, device=seq_N.device)
    mask_SL[seq_N, pos_N] = True
    return out, mask_SL

