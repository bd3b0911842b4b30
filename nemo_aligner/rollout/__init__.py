"""Online-RL infrastructure shared by GRPO and PPO: the rollout batch and its collation into training
rows, generation of one step's rollouts on a data-parallel rank, seeds, reference passes, per-phase times.

    share, first = rank_share(items, run.dp)                       # this rank's prompts (groups never split)
    dataset = generate_rollouts(engine, prompts, share, first, SamplingParams(seed=step_seed(seed, step), ...))
    ... rewards, advantages on the examples (gather_over_dp for batch statistics)
    RolloutReference(module, frozen_copy).fill(dataset, batches, run.executor)   # ref_logps per completion
    batch = collate_rollout(dataset, items, pad_id, packed)       # RolloutBatch: rows + per-completion fields
    logps_SL, mask_SL = per_sequence(head_output_RT, batch)       # a head's dense output, per completion
    return Rollout(dataset, metrics, times)                       # what Online.rollout returns to the loop
"""

from dataclasses import dataclass, field

from nemo_aligner.rollout.batch import (
    RolloutBatch, RolloutDataset, RolloutExample, collate_rollout, pack_in_order, per_sequence,
)
from nemo_aligner.rollout.generate import (
    VALIDATION_STREAM, gather_objects, gather_over_dp, generate_rollouts, rank_share, step_seed,
)
from nemo_aligner.rollout.reference import RolloutReference
from nemo_aligner.rollout.timing import PhaseTimes


@dataclass
class Rollout:
    """One step's rollout on this rank, as an online algorithm hands it to the loop."""

    dataset: RolloutDataset
    metrics: dict = field(default_factory=dict)  # logged under train/ (same values on every rank)
    times: PhaseTimes = field(default_factory=PhaseTimes)  # the loop adds the policy passes


__all__ = ["PhaseTimes", "Rollout", "RolloutBatch", "RolloutDataset", "RolloutExample", "RolloutReference",
           "VALIDATION_STREAM", "collate_rollout", "gather_objects", "gather_over_dp", "generate_rollouts",
           "pack_in_order", "per_sequence", "rank_share", "step_seed"]
