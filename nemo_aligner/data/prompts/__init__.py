"""Prompt data for online RL (GRPO, PPO): rows with a prompt (a string used verbatim, or messages through
the chat template with the generation prompt) whose other columns are handed to the reward functions.

    dataset = PromptDataset.from_files(files, tokenizer, PromptSettings(max_prompt_length=512), name="train")
    dataset.examples[i].ids          # prompt token ids, rendered exactly as generation renders them
    dataset.examples[i].prompt       # the prompt as the row held it (what reward functions get)
    dataset.examples[i].columns      # every other column of the row
"""

from nemo_aligner.data.prompts.dataset import PromptDataset, PromptExample, PromptSettings, prompt_settings

__all__ = ["PromptDataset", "PromptExample", "PromptSettings", "prompt_settings"]
