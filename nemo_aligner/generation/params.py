"""What a generation call takes and returns, whichever engine runs it: `SamplingParams` in, one
`Completion` per (prompt, sample) out, and the `GenerationEngine` protocol both engines implement.

Log-probs are those of the sampled token under the model's distribution at the sampling temperature,
before top-k / top-p truncation (what GRPO's and PPO's importance ratios compare against; TRL and vLLM's
`processed_logprobs` do the same). Greedy (temperature 0) reports the untempered distribution's.
"""

from dataclasses import dataclass, field
from typing import Protocol

from nemo_aligner.config.sections import check_sampling

FINISH_REASONS = ("stop", "length")  # an EOS id or a stop string | max_new_tokens (or the model's context)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_samples: int = 1  # completions per prompt
    seed: int = 0  # completion (i, j) draws from a generator seeded by (seed, i, j): batch-independent
    stop: tuple[str, ...] = ()  # stop strings; the returned text ends before the first one found
    stop_token_ids: tuple[int, ...] | None = None  # None = the engine's end-of-sequence ids

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        check_sampling(self, prefix="SamplingParams")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One completion of prompt `prompt_index` (sample `sample_index` of params.num_samples)."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]  # generated ids; the EOS or stop-string token that ended it included
    text: str  # decoded without special tokens, cut before a stop string
    logprobs: list[float]  # one per token id (see the module docstring)
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = field(default=None)  # the EOS id or stop string that ended it


class GenerationEngine(Protocol):
    """Built-in `generation.Sampler` or `generation.vllm_engine.VLLMEngine`."""

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams, first_index: int = 0
                 ) -> list[Completion]:
        """Completions ordered by (prompt_index, sample_index); prompt i is number first_index + i (its index
        and its seeds), so splitting a list of prompts over calls or ranks changes nothing."""

    def sync_weights(self, model) -> None:
        """Make the engine generate with `model`'s current weights (after an optimiser step)."""
