"""Generation inside the toolkit: a KV-cache sampler on our GPTModel and vLLM as a colocated rollout engine,
behind one interface (`GenerationEngine`: `generate(prompt_token_ids, params) -> list[Completion]`,
`sync_weights(model)`). See docs/generation.md.

    from nemo_aligner.generation import Sampler, SamplingParams
    sampler = Sampler.for_run(run, tokenizer, eos_token_ids(tokenizer, checkpoint_dir))
    completions = sampler.generate(ids, SamplingParams(temperature=1.0, num_samples=8, max_new_tokens=512))
"""

from nemo_aligner.generation.params import FINISH_REASONS, Completion, GenerationEngine, SamplingParams
from nemo_aligner.generation.prompts import eos_token_ids, prompt_token_ids, render_prompt
from nemo_aligner.generation.sampler import Sampler

__all__ = ["Completion", "FINISH_REASONS", "GenerationEngine", "Sampler", "SamplingParams", "eos_token_ids",
           "prompt_token_ids", "render_prompt"]
