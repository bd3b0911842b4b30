"""One step's rollouts on this data-parallel rank: which prompts are this rank's, the step's sampling seed,
and the engine's completions turned into a `RolloutDataset`.

Each rank takes an equal contiguous share of the step's prompts (a prompt's group of completions is never
split over ranks) and generates them with `first_index` = the share's position in the global batch, so
completion (i, j) draws from the seed of (step seed, i, j) whichever rank runs it: dp ranks together
sample exactly what one process samples. The step seed is a function of (model.seed, step), so a resumed
run continues the exact trajectory with the built-in sampler.
"""

import numpy as np
import torch

from nemo_aligner.generation.params import SamplingParams
from nemo_aligner.rollout.batch import RolloutDataset, RolloutExample

VALIDATION_STREAM = 1  # validation rollouts draw from their own seed stream


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """The sampling seed of a step (a 63-bit int), independent of batch size, layout and order."""
    return int(np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0] >> 1)


def rank_share(items: list, dp) -> tuple[list, int]:
    """(this rank's contiguous share of the step's prompts, its first position in the global batch)."""
    if len(items) % dp.size:
        raise ValueError(f"{len(items)} prompts per step cannot be split evenly over {dp.size} data-parallel ranks "
                         "(groups of completions are never split): make model.global_batch_size / "
                         "model.grpo.num_generations a multiple of the data-parallel size")
    per_rank = len(items) // dp.size
    return list(items[dp.rank * per_rank:(dp.rank + 1) * per_rank]), dp.rank * per_rank


def generate_rollouts(engine, prompts, items: list[int], first_index: int, params: SamplingParams) -> RolloutDataset:
    """params.num_samples completions of each prompt `items` (indices into the PromptDataset `prompts`),
    consecutive per prompt; prompt k of the list is number first_index + k of the step."""
    chosen = [prompts.examples[i] for i in items]
    completions = engine.generate([e.ids.tolist() for e in chosen], params, first_index=first_index)
    examples = []
    for c in completions:
        prompt = chosen[c.prompt_index - first_index]
        examples.append(RolloutExample(
            prompt_ids=prompt.ids, completion_ids=np.asarray(c.token_ids, dtype=np.int64), prompt=prompt.prompt,
            text=c.text, columns=prompt.columns, prompt_index=c.prompt_index, sample_index=c.sample_index,
            truncated=c.finish_reason == "length", sampler_logps=np.asarray(c.logprobs, dtype=np.float32)))
    return RolloutDataset(examples)


def gather_over_dp(values: torch.Tensor, dp) -> torch.Tensor:
    """[dp x n, ...] of every rank's equal-sized [n, ...] in rank order (each rank's slice filled, summed)."""
    if dp.size == 1:
        return values
    out = values.new_zeros(dp.size * values.shape[0], *values.shape[1:]).double()
    n = values.shape[0]
    out[dp.rank * n:(dp.rank + 1) * n] = values.double()
    return dp.all_reduce_sum(out).to(values.dtype)


def gather_objects(objects: list, dp) -> list:
    """Every rank's list (equal or not) concatenated in rank order, for logs (rollout texts)."""
    if dp.size == 1:
        return list(objects)
    import torch.distributed as dist

    parts = [None] * dp.size
    dist.all_gather_object(parts, list(objects), group=dp.group)
    return [x for part in parts for x in part]
