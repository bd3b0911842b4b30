"""Generate completions from a model: a Hugging Face folder, a PEFT adapter folder or a training run's log dir.

    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=results/sft_demo \\
        generation.input_file=examples/demo/data/prompts.jsonl generation.output_file=results/generate/out.jsonl
    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=/models/Qwen2.5-0.5B-Instruct \\
        generation.input_file=prompts.jsonl generation.output_file=out.jsonl generation.temperature=0.7 \\
        generation.num_samples=4 generation.max_new_tokens=512 "generation.stop=['\\n\\n']"
    torchrun --nproc_per_node=2 examples/nlp/gpt/generate.py trainer.devices=2 model.tensor_model_parallel_size=2 ...

Rows of the input file: `prompt` = a string (used verbatim) or a list of {role, content} messages (the chat
template with the generation prompt, as in training); other columns are copied to the output. Config:
conf/generate.yaml (every key documented in nemo_aligner/config/generate.py).
"""

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from nemo_aligner.config.generate import GenerateRunConfig
from nemo_aligner.recipes.generate import run_generate
from nemo_aligner.recipes.skeleton import main_entry

ConfigStore.instance().store(name="generate_schema", node=GenerateRunConfig)


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(raw: DictConfig) -> None:
    main_entry(raw, GenerateRunConfig, run_generate)  # one-line user errors (exit 1), as the training scripts


if __name__ == "__main__":
    main()
