"""Generate completions from a model: a Hugging Face folder, a PEFT adapter folder or a training run's log dir.

    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=results/sft_demo \\
        generation.input_file=nemo_aligner/demo/data/prompts.jsonl generation.output_file=results/generate/out.jsonl
    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=/models/Qwen2.5-0.5B-Instruct \\
        generation.input_file=prompts.jsonl generation.output_file=out.jsonl generation.temperature=0.7 \\
        generation.num_samples=4 generation.max_new_tokens=512 "generation.stop=['\\n\\n']"
    torchrun --nproc_per_node=2 examples/nlp/gpt/generate.py trainer.devices=2 model.tensor_model_parallel_size=2 ...

Rows of the input file: `prompt` = a string (used verbatim) or a list of {role, content} messages (the chat
template with the generation prompt, as in training); other columns are copied to the output. Config:
nemo_aligner/conf/generate.yaml (every key documented in nemo_aligner/config/generate.py).

The same command as `nemo-aligner generate`; `--help` lists every key with its default and meaning.
"""

from nemo_aligner.cli import run_command

if __name__ == "__main__":
    run_command("generate")  # the same as `nemo-aligner generate ...` (nemo_aligner/cli.py)
