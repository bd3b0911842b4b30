"""The config sections every recipe shares, with NeMo-Aligner's key names: trainer, exp_manager,
pretrained_checkpoint and model (batch layout, parallel sizes, architecture, tokenizer, optimiser,
LoRA, and the data options common to every task). A recipe's schema (`config.dpo`, `config.sft`)
adds its loop (`trainer.<algorithm>`), its data section and its algorithm section.

The defaults here are the real defaults: YAML files hold only what a recipe or its demo changes.
Every field has a one-line doc. Checks that need more than a type live in `__post_init__` and raise
ValueError naming the full key. Nothing here imports torch.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.models.lora_names import INIT_METHODS, resolve_target_modules

def _choice(key: str, value, choices):
    if value not in choices:
        raise ValueError(f"{key}={value!r}; expected one of {list(choices)}")


def parse_max_time(value) -> float:
    """trainer.max_time "DD:HH:MM:SS" (NeMo / Lightning) -> seconds."""
    parts = str(value).split(":")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"trainer.max_time={value!r}; expected \"DD:HH:MM:SS\" (e.g. 00:03:50:00) or null")
    days, hours, minutes, seconds = (int(p) for p in parts)
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ValueError(f"trainer.max_time={value!r}; expected a positive duration")
    return float(total)


def _fraction_or_count(key: str, value, allow_zero=True):
    """NeMo's convention: a float is a fraction (0..1], an int is a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r}; expected an int (count) or a float fraction in (0, 1]")
    if isinstance(value, float) and not (0.0 <= value <= 1.0) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{key}={value!r}; expected an int >= 0 or a float in [0, 1]")
    if not allow_zero and value == 0:
        raise ValueError(f"{key}=0; expected a positive count or fraction")


def check_sampling(params, prefix: str) -> None:
    """ValueError naming `<prefix>.<key>` for a sampling setting out of range (any object with the fields:
    generation.*, exp_manager.val_samples.*, generation.SamplingParams)."""
    if params.max_new_tokens <= 0:
        raise ValueError(f"{prefix}.max_new_tokens={params.max_new_tokens}; expected a positive integer")
    if params.temperature < 0:
        raise ValueError(f"{prefix}.temperature={params.temperature}; expected >= 0 (0 = greedy)")
    if params.top_k < 0:
        raise ValueError(f"{prefix}.top_k={params.top_k}; expected >= 0 (0 = no top-k truncation)")
    if not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"{prefix}.top_p={params.top_p}; expected 0 < top_p <= 1 (1 = no nucleus truncation)")
    num_samples = getattr(params, "num_samples", 1)
    if num_samples <= 0:
        raise ValueError(f"{prefix}.num_samples={num_samples}; expected a positive integer")
    if params.temperature == 0 and num_samples > 1:
        raise ValueError(f"{prefix}.num_samples={num_samples} with {prefix}.temperature=0 (greedy) would give "
                         "identical completions; set a temperature > 0 or num_samples=1")
    stop = list(getattr(params, "stop", None) or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"{prefix}.stop={stop!r}; expected a list of non-empty strings")


# ---------------------------------------------------------------- trainer
@dataclass
class LoopConfig:
    """trainer.<algorithm> (trainer.dpo, trainer.sft): cadence of the training loop."""

    max_epochs: int = 1  # passes over the training data
    max_steps: int = -1  # optimiser steps; -1 = derived from max_epochs
    val_check_interval: Any = 0.1  # int = every N steps, float = fraction of an epoch
    save_interval: int = 100  # checkpoint every N steps (0 = only at the end)
    limit_train_batches: Any = 1.0  # int = batches per epoch, float = fraction of the epoch
    limit_val_batches: Any = 1.0  # int = batches, float = fraction, 0 = no validation
    gradient_clip_val: float = 1.0  # max global grad norm; 0 = no clipping

    def __post_init__(self):
        _fraction_or_count("trainer.*.val_check_interval", self.val_check_interval, allow_zero=False)
        _fraction_or_count("trainer.*.limit_train_batches", self.limit_train_batches, allow_zero=False)
        _fraction_or_count("trainer.*.limit_val_batches", self.limit_val_batches)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"trainer.*.max_steps={self.max_steps}; expected -1 or a positive integer")


@dataclass
class TrainerConfig:
    """trainer: the launch and precision; a recipe's schema adds its loop (trainer.dpo, trainer.sft)."""

    num_nodes: int = 1  # machines (NeMo's default is 8; ours runs anywhere)
    devices: int = 1  # processes (GPUs) per machine
    accelerator: str = "auto"  # auto | cpu | gpu
    precision: Any = 32  # 32 | bf16-mixed (fp32 master weights, bf16 autocast); bf16 and 16 accepted as aliases
    log_every_n_steps: int = 1  # kept for NeMo command lines; every step is logged
    # "DD:HH:MM:SS" (NeMo's): stop before this much time since the run started, allowing for one more step
    # and a checkpoint save: checkpoint saved, no export, exit code 75; rerun to continue. null = no limit
    max_time: Optional[str] = None

    def __post_init__(self):
        if self.max_time is not None:
            parse_max_time(self.max_time)
        self.precision = str(self.precision)
        _choice("trainer.precision", self.precision, ("32", "32-true", "bf16", "bf16-mixed", "16", "16-mixed"))
        _choice("trainer.accelerator", self.accelerator, ("auto", "cpu", "gpu", "cuda"))


# ---------------------------------------------------------------- exp_manager
@dataclass
class WandbKwargs:
    project: Optional[str] = "nemo_aligner"
    name: Optional[str] = None
    mode: str = "offline"  # offline unless told otherwise (online needs an API key and network)


@dataclass
class CheckpointParams:
    save_top_k: int = 3  # keep the k best checkpoints by `monitor` (plus the latest, for resume)
    monitor: str = "val_loss"  # val_<metric> to rank checkpoints by
    mode: str = "min"  # min | max
    save_nemo_on_train_end: bool = True  # export the final model to <log_dir>/hf (Hugging Face; NeMo's .nemo); false = no export
    always_save_nemo: bool = False  # kept for NeMo command lines
    save_hf_every_checkpoint: bool = False  # also export a Hugging Face folder with every checkpoint
    filename: Optional[str] = None  # kept for NeMo command lines
    model_parallel_size: Optional[int] = None  # kept for NeMo command lines
    save_best_model: bool = False  # kept for NeMo command lines

    def __post_init__(self):
        _choice("exp_manager.checkpoint_callback_params.mode", self.mode, ("min", "max"))


@dataclass
class ValSamplesConfig:
    """exp_manager.val_samples: replies to the first validation prompts, generated after every validation and
    logged to <log_dir>/val_samples.jsonl and TensorBoard (text `val/samples`). Same prompt tokens as the
    validation data (its chat template and BOS), the model's EOS ids stop a reply."""

    num_prompts: int = 0  # how many validation prompts (the first ones); 0 = off
    max_new_tokens: int = 64  # tokens per reply at most
    temperature: float = 0.0  # 0 = greedy (the same replies at every validation for an unchanged model)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 1234  # sampling seed (temperature > 0)

    def __post_init__(self):
        if self.num_prompts < 0:
            raise ValueError(f"exp_manager.val_samples.num_prompts={self.num_prompts}; expected >= 0 (0 = off)")
        check_sampling(self, "exp_manager.val_samples")


@dataclass
class ExpManagerConfig:
    explicit_log_dir: Optional[str] = None  # all outputs go here
    exp_dir: Optional[str] = None  # used when explicit_log_dir is null: <exp_dir>/<name>
    name: str = "run"
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: WandbKwargs = field(default_factory=WandbKwargs)
    resume_if_exists: bool = True  # continue from <log_dir>/checkpoints/latest when present
    resume_ignore_no_checkpoint: bool = True  # no checkpoint yet: start fresh instead of failing
    create_checkpoint_callback: bool = True
    checkpoint_callback_params: CheckpointParams = field(default_factory=CheckpointParams)
    progress_bar: bool = True  # tqdm progress bar (off in CI logs is fine too)
    val_samples: ValSamplesConfig = field(default_factory=ValSamplesConfig)  # generated replies at each validation


@dataclass
class PretrainedCheckpoint:
    restore_from_path: Optional[str] = None  # Hugging Face folder (config.json + safetensors); null = build from model.*


# ---------------------------------------------------------------- model
@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # folder with tokenizer.json or a sentencepiece .model; null = the checkpoint's
    type: str = "auto"  # auto | huggingface | sentencepiece


@dataclass
class DataConfig:
    """model.data options every task shares; a recipe's schema adds its own (row keys, rewards, ...)."""

    data_impl: str = "jsonl"  # jsonl | parquet (read by file suffix either way); DPO also: packed_jsonl
    # {train: [files], validation: [files], test: [files]} (test: evaluated once at the end); null = none
    data_prefix: Any = field(default_factory=lambda: {"train": None, "validation": None, "test": None})
    seq_length: Optional[int] = None  # max tokens per sequence (prompt + response); null = model.encoder_seq_length
    overlength: str = "truncate"  # truncate (cut the prompt from the left, then the response) | drop | error
    chat_template: Optional[str] = None  # built-in name (chatml, llama3, qwen2_5, extra_id, plain) or jinja; null = tokenizer's
    add_bos: Optional[bool] = None  # prepend BOS unless the text starts with it; null = when the tokenizer defines one
    add_eos: bool = True  # append EOS to string responses that do not already end with it
    shuffle: bool = True  # shuffle the training order each epoch (seeded by model.seed and the epoch)
    packing: bool = False  # pack examples at start-up into rows of pack_size tokens; batch sizes then count packs
    pack_size: Optional[int] = None  # tokens per pack for online packing; null = the longest row there can be
    packing_algorithm: str = "best_fit_decreasing"  # | first_fit_decreasing | first_fit_shuffle (seeded by model.seed)
    num_workers: int = 0  # kept for NeMo command lines; data is tokenised up front

    def __post_init__(self):
        _choice("model.data.overlength", self.overlength, ("truncate", "drop", "error"))
        _choice("model.data.packing_algorithm", self.packing_algorithm,
                ("best_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle"))
        if self.seq_length is not None and self.seq_length < 2:
            raise ValueError(f"model.data.seq_length={self.seq_length}; expected >= 2 (a context token and a label)")
        if self.pack_size is not None and self.pack_size <= 0:
            raise ValueError(f"model.data.pack_size={self.pack_size}; expected a positive integer or null")


@dataclass
class SchedConfig:
    name: str = "CosineAnnealing"  # CosineAnnealing | constant | linear
    warmup_steps: int = 10  # lr rises linearly to model.optim.lr over these steps
    # steps held at min_lr at the end (NeMo's gpt_dpo.yaml: 1000). A run shorter than warmup + constant steps
    # gets no cosine decay (lr drops to min_lr right after warmup): a warning prints the resulting lr curve;
    # set 0 for a cosine over the whole run
    constant_steps: int = 1000
    min_lr: float = 9e-7
    max_steps: Optional[int] = None  # decay horizon; null = the run's max steps

    def __post_init__(self):
        _choice("model.optim.sched.name", self.name, ("CosineAnnealing", "constant", "linear"))


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (NeMo's distributed_fused_adam / fused_adam / adam map to AdamW)
    lr: float = 9e-6  # NeMo-Aligner's gpt_dpo.yaml (SFT: config/sft.py); may change on resume (logged)
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    sched: SchedConfig = field(default_factory=SchedConfig)

    def __post_init__(self):
        _choice("model.optim.name", self.name, ("adamw", "adam", "fused_adam", "distributed_fused_adam"))


@dataclass
class LoraConfig:
    """model.peft.lora_tuning: which projections get adapters and how they start (NeMo's keys)."""

    target_modules: list = field(default_factory=lambda: ["attention_qkv"])  # NeMo names (attention_qkv, attention_dense, mlp_fc1, mlp_fc2, attention, mlp, all) or HF ones (q_proj ... down_proj, c_attn, c_proj, c_fc)
    adapter_dim: int = 32  # rank r
    alpha: Optional[float] = None  # scale = alpha / adapter_dim; null = adapter_dim (scale 1, NeMo's default; PEFT's lora_alpha=8 differs)
    adapter_dropout: float = 0.0  # dropout on the adapter's input
    column_init_method: str = "xavier"  # A: xavier | normal | kaiming | zero
    row_init_method: str = "zero"  # B: zero (adapter output 0 at the start) | normal | xavier | kaiming

    def __post_init__(self):
        resolve_target_modules(self.target_modules)
        if self.adapter_dim <= 0:
            raise ValueError(f"model.peft.lora_tuning.adapter_dim={self.adapter_dim}; expected a positive integer")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"model.peft.lora_tuning.alpha={self.alpha}; expected > 0 or null")
        if not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"model.peft.lora_tuning.adapter_dropout={self.adapter_dropout}; expected [0, 1)")
        _choice("model.peft.lora_tuning.column_init_method", self.column_init_method, INIT_METHODS)
        _choice("model.peft.lora_tuning.row_init_method", self.row_init_method, INIT_METHODS)


@dataclass
class PeftConfig:
    """model.peft: LoRA adapters on a frozen base (nemo_aligner/models/lora.py)."""

    peft_scheme: str = "none"  # none | lora
    restore_from_path: Optional[str] = None  # PEFT adapter folder to continue from (its ranks/targets win over lora_tuning)
    merge_on_export: bool = False  # final hf/ = merged model (W + scale B A) instead of a PEFT adapter folder
    lora_tuning: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        _choice("model.peft.peft_scheme", self.peft_scheme, ("none", "lora"))


@dataclass
class ModelConfig:
    """model: what every recipe shares; a recipe's schema adds `data` and its algorithm section."""

    # ---- batch and parallel layout
    micro_batch_size: int = 1  # items (examples, or packs with packed data) per forward/backward
    global_batch_size: int = 64  # items per optimiser step (accumulation fills the difference)
    seed: int = 1234
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    pipeline_layer_split: Optional[list] = None  # transformer layers per pipeline stage, e.g. [6, 10]; null = even split
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe (micro-batches per step = global / (micro x data-parallel))
    # max tokens per sequence (also the pack size with packed data); capped at the checkpoint's
    # max_position_embeddings (logged) unless model.data.seq_length says otherwise
    encoder_seq_length: int = 4096
    # ---- architecture, used when pretrained_checkpoint.restore_from_path is null (Megatron key names;
    # the defaults are GPTConfig's, tests/test_config.py checks that every GPTConfig field is here or derived)
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # key/value heads (GQA); null = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; null = hidden_size / num_attention_heads
    normalization: str = "rmsnorm"  # rmsnorm | layernorm
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | geglu | reglu | gelu | gelu_tanh | relu | squared-relu | silu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_base: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 | longrope
    rope_scaling_factor: float = 1.0  # linear, llama3, longrope (context extension ratio)
    rope_low_freq_factor: float = 1.0  # llama3 rope scaling only
    rope_high_freq_factor: float = 4.0  # llama3 rope scaling only
    rope_original_max_position_embeddings: int = 8192  # llama3, longrope: the pre-training context length
    max_position_embeddings: int = 2048
    add_qkv_bias: bool = False
    add_bias_linear: bool = False  # attention output and MLP biases
    share_embeddings_and_output_weights: bool = False
    sliding_window: Optional[int] = None  # local attention window (tokens) of the "sliding" layers; null = full attention
    vocab_size: Optional[int] = None  # null = the tokenizer's vocabulary size
    init_method_std: float = 0.02
    layer_types: Optional[list] = None  # per layer "sliding" | "full"; null = every layer slides iff sliding_window is set
    qk_norm: str = "none"  # none | head (RMSNorm per q/k head before RoPE: Qwen3, Gemma 3) | full (whole projection: OLMo 2)
    norm_placement: str = "pre"  # pre (Llama) | sandwich (also after attention and MLP: Gemma 2/3) | post (OLMo 2)
    layernorm_zero_centered_gamma: bool = False  # RMSNorm scales by (1 + weight), weight initialised to 0 (Gemma)
    embedding_multiplier: float = 1.0  # token embeddings times this (Gemma: hidden_size ** 0.5)
    softmax_scale: Optional[float] = None  # attention score scale; null = kv_channels ** -0.5
    attn_logit_softcapping: Optional[float] = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_logit_softcapping: Optional[float] = None  # logits -> cap * tanh(logits / cap), in the log-probs too (Gemma 2)
    rotary_base_local: Optional[float] = None  # RoPE base of the "sliding" layers (Gemma 3); null = rotary_base
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates (Phi-3's partial_rotary_factor)
    rope_short_factor: Optional[list] = None  # longrope: per-frequency divisors within the original context
    rope_long_factor: Optional[list] = None  # longrope: per-frequency divisors beyond it
    rope_attention_factor: Optional[float] = None  # longrope: cos/sin multiplier; null = sqrt(1 + ln factor / ln original)
    # ---- memory / speed
    activations_checkpoint_granularity: Optional[str] = None  # null | full (recompute each layer) | selective (= full)
    activations_checkpoint_method: Optional[str] = None  # kept for NeMo command lines (uniform/block)
    activations_checkpoint_num_layers: Optional[int] = None  # kept for NeMo command lines
    compile: bool = False  # torch.compile each transformer block (inductor); the first steps include compile time
    sequence_parallel: bool = False  # with tensor parallel: shard norms/dropout activations over the sequence
    megatron_amp_O2: bool = False  # kept for NeMo command lines; master weights are always fp32
    mcore_gpt: bool = True  # kept for NeMo command lines
    # ---- sections
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)

    def __post_init__(self):
        for key in ("micro_batch_size", "global_batch_size", "tensor_model_parallel_size",
                    "pipeline_model_parallel_size", "encoder_seq_length"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)}; expected a positive integer")
        _choice("model.pipeline_schedule", self.pipeline_schedule, ("1f1b", "gpipe"))
        if self.activations_checkpoint_granularity not in (None, "full", "selective"):
            raise ValueError(f"model.activations_checkpoint_granularity={self.activations_checkpoint_granularity!r}; "
                             "expected null, full or selective")

    @property
    def seq_length(self) -> int:
        """Max tokens of one sequence: model.data.seq_length, else model.encoder_seq_length."""
        return self.data.seq_length or self.encoder_seq_length


@dataclass
class RunConfig:
    """The sections every run config has at its root; a recipe's schema adds `trainer` and `model`."""

    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
