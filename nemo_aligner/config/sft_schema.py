"""Typed run configuration for SFT (examples/nlp/gpt/conf/gpt_sft.yaml), reusing the DPO schema's parts.

`trainer`, `exp_manager`, `pretrained_checkpoint` and the architecture / optimiser part of `model` are
the same dataclasses as DPO's; `model.data` is the SFT data section and `model.sft` replaces
`model.dpo`. Unknown keys and wrong types fail at start-up naming the key
(`nemo_aligner.config.load_config(raw, SFTRunConfig)`).
"""

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.config.schema import (
    DataConfig, DPOConfig, ExpManagerConfig, ModelConfig, PretrainedCheckpoint, TrainerConfig, WandbKwargs, _choice,
)

ROW_FORMATS = ("auto", "nemo_chat", "messages", "prompt_completion", "roll")
LOSS_ON = ("all_assistant", "last_assistant")
LOSS_NORMALIZATIONS = ("tokens", "sequences")


@dataclass
class SFTDataConfig:
    """model.data for SFT: files, row shape and key mapping, template, over-length policy, packing."""

    data_impl: str = "jsonl"  # jsonl | parquet (read by file suffix either way)
    data_prefix: Any = None  # {train: [files], validation: [files], test: [files]}
    seq_length: Optional[int] = None  # max tokens per example; null = model.encoder_seq_length
    overlength: str = "truncate"  # truncate (leading context from the left, then the end) | drop | error
    row_format: str = "auto"  # auto (detected per row) | nemo_chat | messages | prompt_completion | roll
    system_key: Optional[str] = "system"  # ROLL rows: system prompt column (absent or empty = no system turn)
    prompt_key: str = "instruction"  # ROLL rows: the user turn
    query_key: Optional[str] = "input"  # ROLL rows: appended to the user turn after a newline when non-empty
    response_key: str = "output"  # ROLL rows: the assistant turn (trained on)
    loss_on: str = "all_assistant"  # all_assistant | last_assistant: which assistant turns carry labels
    chat_template: Optional[str] = None  # chatml | llama3 | qwen2_5 | extra_id | plain | jinja; null = tokenizer's
    add_bos: Optional[bool] = None  # prepend BOS unless the text starts with it; null = when the tokenizer has one
    add_eos: bool = True  # append EOS to string completions (templated turns end with the template's marker)
    shuffle: bool = True  # shuffle the training order each epoch (seeded by model.seed and the epoch)
    packing: bool = False  # pack examples online into rows of pack_size tokens (block-diagonal attention)
    pack_size: Optional[int] = None  # tokens per pack; null = seq_length (the longest padded row there could be)
    packing_algorithm: str = "best_fit_decreasing"  # best_fit_decreasing | first_fit_decreasing | first_fit_shuffle
    chat: Optional[bool] = None  # kept for NeMo command lines: the row shape is detected per row
    num_workers: int = 0  # kept for NeMo command lines; data is tokenised up front

    def __post_init__(self):
        _choice("model.data.data_impl", self.data_impl, ("jsonl", "parquet"))
        _choice("model.data.overlength", self.overlength, ("truncate", "drop", "error"))
        _choice("model.data.row_format", self.row_format, ROW_FORMATS)
        _choice("model.data.loss_on", self.loss_on, LOSS_ON)
        _choice("model.data.packing_algorithm", self.packing_algorithm,
                ("best_fit_decreasing", "first_fit_decreasing", "first_fit_shuffle"))
        if self.seq_length is not None and self.seq_length < 2:
            raise ValueError(f"model.data.seq_length={self.seq_length}; expected >= 2 (a context token and a label)")
        if self.pack_size is not None and self.pack_size <= 0:
            raise ValueError(f"model.data.pack_size={self.pack_size}; expected a positive integer")


@dataclass
class SFTConfig:
    """model.sft: the loss."""

    # tokens: mean NLL over the global batch's response tokens | sequences: mean over sequences of each
    # sequence's mean token NLL
    loss_normalization: str = "tokens"
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection (memory vs speed)

    def __post_init__(self):
        _choice("model.sft.loss_normalization", self.loss_normalization, LOSS_NORMALIZATIONS)
        if self.logprob_chunk_size <= 0:
            raise ValueError(f"model.sft.logprob_chunk_size={self.logprob_chunk_size}; expected a positive integer")


# model.* of gpt_sft.yaml: every field of the DPO ModelConfig (batch layout, architecture, tokenizer,
# optim, peft) with `data` replaced by the SFT data section and `dpo` by `sft`, so model.dpo.* is an
# unknown key here. Built from ModelConfig's fields so the two never drift apart.
_SHARED_MODEL_FIELDS = [(f.name, f.type, f) for f in dataclasses.fields(ModelConfig) if f.name not in ("data", "dpo")]


def _check_sft_model(self):
    # ModelConfig's own checks (batch layout, parallel sizes, ...) run on a copy holding default DPO
    # data/dpo sections, since its model.data checks are DPO's (e.g. pack_size >= 2 x seq_length for pairs).
    shared = copy.copy(self)
    shared.data, shared.dpo = DataConfig(seq_length=self.data.seq_length), DPOConfig()
    ModelConfig.__post_init__(shared)
    if self.data.packing and self.data.pack_size is not None and self.data.pack_size < self.seq_length:
        raise ValueError(f"model.data.pack_size={self.data.pack_size} < seq_length ({self.seq_length}, from "
                         "model.data.seq_length or model.encoder_seq_length): every example must fit in one pack; "
                         f"use model.data.pack_size >= {self.seq_length} or null")


SFTModelConfig = dataclasses.make_dataclass(
    "SFTModelConfig",
    _SHARED_MODEL_FIELDS + [("data", SFTDataConfig, field(default_factory=SFTDataConfig)),
                            ("sft", SFTConfig, field(default_factory=SFTConfig))],
    namespace={"__post_init__": _check_sft_model, "seq_length": ModelConfig.seq_length,
               "__doc__": "model.* for SFT: ModelConfig's fields, SFT data section, model.sft."},
)
SFTModelConfig.__module__ = __name__


def _sft_trainer() -> TrainerConfig:
    return TrainerConfig()


def _sft_exp_manager() -> ExpManagerConfig:
    return ExpManagerConfig(explicit_log_dir="results/sft_demo", wandb_logger_kwargs=WandbKwargs(name="sft_demo"))


@dataclass
class SFTRunConfig:
    """The whole of gpt_sft.yaml."""

    name: str = "megatron_gpt_sft"
    trainer: TrainerConfig = field(default_factory=_sft_trainer)
    exp_manager: ExpManagerConfig = field(default_factory=_sft_exp_manager)
    pretrained_checkpoint: PretrainedCheckpoint = field(default_factory=PretrainedCheckpoint)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
