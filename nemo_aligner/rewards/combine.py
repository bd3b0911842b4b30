"""`RewardFunctions`: call every reward function on a batch of completions, check what each returns,
and combine them with their weights as TRL's GRPOTrainer does.

Per completion, the reward is Σ_f w_f·r_f over the functions that scored it (a None is "this function
does not score that sample": NaN here, left out of the sum and of the function's mean); a completion no
function scored has reward NaN, which the advantages ignore (`losses.policy.group_advantages`).

A function that raises, returns something that is not one number-or-None per completion, or returns
NaN / ±inf stops the run with one `RewardError` naming the function, where it came from, and the first
bad sample (its index, prompt and completion). When a call on the whole batch raises, the samples are
retried one at a time to find the first that fails on its own.

A reward model (`model.grpo.reward_model_path`) is one more `RewardFunction` with the same signature.
"""

import math
import numbers
from typing import Any, Optional, Sequence

import torch

from nemo_aligner.losses.policy import nanstd
from nemo_aligner.rewards.loading import RewardFunction, _describe, load_reward_functions

Tensor = torch.Tensor
SHOWN_CHARS = 200  # of a prompt / completion quoted in an error


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it and the sample."""


class RewardScores:
    """Rewards of one batch: per function [B, F] (NaN = not scored), their weights [F] and names."""

    def __init__(self, per_function_BF: Tensor, weights_F: Tensor, names: Sequence[str]):
        self.per_function_BF = per_function_BF
        self.weights_F = weights_F
        self.names = list(names)

    @property
    def rewards_B(self) -> Tensor:
        """Weighted sum over the functions that scored each sample; NaN where none did (TRL)."""
        weighted_BF = self.per_function_BF * self.weights_F.to(self.per_function_BF.dtype)
        total_B = torch.nansum(weighted_BF, dim=1)
        unscored_B = torch.isnan(self.per_function_BF).all(dim=1)
        return torch.where(unscored_B, torch.full_like(total_B, float("nan")), total_B)

    def metrics(self) -> dict[str, float]:
        """`rewards/<name>/mean` and `/std` over the samples each function scored (TRL's nanmean / nanstd)."""
        out = {}
        for i, name in enumerate(self.names):
            column = self.per_function_BF[:, i]
            out[f"rewards/{name}/mean"] = float(torch.nanmean(column))
            out[f"rewards/{name}/std"] = float(nanstd(column))
        return out


class RewardFunctions:
    """The reward functions of a run with their weights; call it on a batch to get `RewardScores`."""

    def __init__(self, functions: Sequence[RewardFunction], weights: Optional[Sequence[float]] = None,
                 key: str = "model.grpo.reward_funcs"):
        if not functions:
            raise ValueError(f"{key} is empty and there is no reward model (model.grpo.reward_model_path): "
                             "GRPO needs at least one reward")
        if weights is None:
            weights = [1.0] * len(functions)
        if len(weights) != len(functions):
            raise ValueError(f"model.grpo.reward_weights has {len(weights)} entries, expected {len(functions)} "
                             f"(one per reward: {[f.name for f in functions]})")
        if not all(isinstance(w, numbers.Real) and math.isfinite(w) for w in weights):
            raise ValueError(f"model.grpo.reward_weights={list(weights)}; expected finite numbers")
        self.functions = list(functions)
        self.weights = [float(w) for w in weights]

    @classmethod
    def from_specs(cls, specs: Sequence[Any], weights: Optional[Sequence[float]] = None,
                   extra: Sequence[RewardFunction] = (), untrusted_dirs: Sequence = ()) -> "RewardFunctions":
        """Load `model.grpo.reward_funcs`; `extra` (the reward model) comes after them, as its weight does."""
        return cls(load_reward_functions(specs, untrusted_dirs=untrusted_dirs) + list(extra), weights)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.functions]

    def __call__(self, prompts: Sequence, completions: Sequence, completion_ids: Sequence,
                 columns: Optional[dict[str, Sequence]] = None) -> RewardScores:
        """Score a batch; `columns` are the dataset columns of each sample (lists as long as `completions`)."""
        columns = dict(columns or {})
        clash = sorted(set(columns) & {"prompts", "completions", "completion_ids"})
        if clash:
            raise ValueError(f"dataset column(s) {clash} clash with the arguments every reward function gets; "
                             "rename them in the data")
        n = len(completions)
        for name, values in (("prompts", prompts), ("completion_ids", completion_ids), *columns.items()):
            if len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} completions")
        per_function = [self._call_one(f, prompts, completions, completion_ids, columns) for f in self.functions]
        per_function_BF = torch.tensor(per_function, dtype=torch.float32).reshape(len(self.functions), n).T
        return RewardScores(per_function_BF.contiguous(), torch.tensor(self.weights), self.names)

    def _call_one(self, reward: RewardFunction, prompts, completions, completion_ids, columns) -> list[float]:
        try:
            out = reward.fn(prompts=list(prompts), completions=list(completions),
                            completion_ids=list(completion_ids), **{k: list(v) for k, v in columns.items()})
        except Exception as err:  # noqa: BLE001 - any failure in a user function is reported, with its sample
            raise self._locate_failure(reward, err, prompts, completions, completion_ids, columns) from None
        return _check_output(reward, out, prompts, completions)

    def _locate_failure(self, reward, err, prompts, completions, completion_ids, columns) -> RewardError:
        for i in range(len(completions)):
            try:
                reward.fn(prompts=[prompts[i]], completions=[completions[i]], completion_ids=[completion_ids[i]],
                          **{k: [v[i]] for k, v in columns.items()})
            except Exception as single:  # noqa: BLE001
                return RewardError(f"reward function {reward.name!r} ({reward.source}) raised {_describe(single)} "
                                   f"on sample {i}: {_sample(prompts, completions, i)}")
        return RewardError(f"reward function {reward.name!r} ({reward.source}) raised {_describe(err)} on the batch "
                           f"of {len(completions)} samples (each sample alone succeeds)")


def _check_output(reward: RewardFunction, out: Any, prompts, completions) -> list[float]:
    n = len(completions)
    what = f"reward function {reward.name!r} ({reward.source})"
    try:
        if isinstance(out, (str, bytes, dict)):
            raise TypeError
        out = list(out)  # lists, tuples, numpy arrays, 1-d tensors
    except TypeError:
        raise RewardError(f"{what} returned {type(out).__name__}; expected a list of {n} floats or None "
                          "(one per completion)") from None
    if len(out) != n:
        first = min(len(out), n)
        detail = (f"the first completion without a reward is sample {first}: {_sample(prompts, completions, first)}"
                  if len(out) < n else f"{len(out) - n} more than there are completions")
        raise RewardError(f"{what} returned {len(out)} rewards for {n} completions (one per completion); {detail}")
    values = []
    for i, value in enumerate(out):
        values.append(_as_reward(what, value, i, prompts, completions))
    return values


def _as_reward(what: str, value: Any, i: int, prompts, completions) -> float:
    if value is None:
        return float("nan")  # not scored by this function
    try:
        number = float(value)  # python / numpy numbers, bools, 0-d tensors
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, (str, bytes)):
        raise RewardError(f"{what} returned {value!r:.60} ({type(value).__name__}) for sample {i}; expected a float "
                          f"or None: {_sample(prompts, completions, i)}")
    if not math.isfinite(number):
        raise RewardError(f"{what} returned {number} for sample {i} (use None for 'not scored'): "
                          f"{_sample(prompts, completions, i)}")
    return number


def _sample(prompts, completions, i: int) -> str:
    return f"prompt {_short(prompts[i])}, completion {_short(completions[i])}"


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "...'"
