"""The generate run config (nemo_aligner/conf/generate.yaml); its sampling keys are checked by
`sections.check_sampling`, as exp_manager.val_samples and `generation.SamplingParams` are.

    python examples/nlp/gpt/generate.py pretrained_checkpoint.restore_from_path=DIR \
        generation.input_file=prompts.jsonl generation.output_file=out.jsonl generation.temperature=0

Keys follow NeMo-Aligner's PPO sampling names where they exist (`sampling_params.{temperature, top_k,
top_p}`, `end_strings` -> `stop`) and vLLM's otherwise. Nothing here imports torch.
"""

from dataclasses import dataclass, field
from typing import Optional

from nemo_aligner.config.sections import PretrainedCheckpoint, TokenizerConfig, TrainerConfig, _choice, check_sampling

BACKENDS = ("builtin", "vllm")


@dataclass
class GenerationConfig:
    """generation: what to read, what to write and how to sample."""

    input_file: Optional[str] = None  # jsonl: a row per prompt; `prompt` = a string (verbatim) or a list of messages
    # jsonl: each input row plus completions, completion_token_ids, completion_logprobs, finish_reasons
    output_file: Optional[str] = None
    prompt_key: str = "prompt"  # the column that holds the prompt
    max_new_tokens: int = 256  # tokens generated per completion at most (finish reason `length`)
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus: the smallest set of tokens with this much probability (1 = off)
    num_samples: int = 1  # completions per prompt
    seed: int = 1234  # sampling is a function of (seed, prompt index, sample index), whatever the batch
    batch_size: int = 32  # completions decoded together (a prompt's samples share one batch and one prefill)
    backend: str = "builtin"  # builtin (KV-cache sampler, runs everywhere) | vllm (pip install nemo_aligner[vllm])
    stop: list = field(default_factory=list)  # stop strings (the text ends before them); EOS ids always stop
    chat_template: Optional[str] = None  # message prompts: built-in name or jinja; null = the tokenizer's (as training)
    add_bos: Optional[bool] = None  # prepend BOS unless there; null = when the tokenizer has one (as training)
    precision: str = "32"  # 32 | bf16 (weights cast to bf16 for generation)
    vllm_kv_cache_gib: Optional[float] = 1.0  # backend=vllm: its KV cache memory; null = vLLM's gpu_memory_utilization
    progress_bar: bool = True  # show a progress bar over the prompts

    def __post_init__(self):
        check_sampling(self, "generation")
        _choice("generation.backend", self.backend, BACKENDS)
        _choice("generation.precision", str(self.precision), ("32", "bf16"))
        self.precision = str(self.precision)
        if self.batch_size <= 0:
            raise ValueError(f"generation.batch_size={self.batch_size}; expected a positive integer")


@dataclass
class GenerateModelConfig:
    """model: the parallel layout and tokenizer of a generate run (the architecture comes from the checkpoint)."""

    tensor_model_parallel_size: int = 1  # ranks one layer is split over (torchrun)
    pipeline_model_parallel_size: int = 1  # must be 1: generation runs whole layers on each rank
    micro_batch_size: int = 1  # kept so the parallel layout checks read as in training
    global_batch_size: int = 1  # kept for NeMo command lines; generation.batch_size sets the batch
    sequence_parallel: bool = False  # must be false for generation (one token per step cannot be split)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


@dataclass
class GenerateRunConfig:
    """The whole of generate.yaml."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: GenerateModelConfig = field(default_factory=GenerateModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
