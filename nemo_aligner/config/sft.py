"""The SFT run config (nemo_aligner/conf/gpt_sft.yaml): the shared sections plus trainer.sft,
the SFT data section and model.sft, with NeMo-Aligner's key names.

Where SFT's real defaults differ from DPO's they are NeMo-Aligner's gpt_sft.yaml values: lr 3e-5,
weight_decay 0.01 (betas, CosineAnnealing warmup 10 / constant 1000 / min_lr 9e-7 as DPO's), global batch
128, validation and checkpoint every 100 steps.

Unknown keys and wrong types fail at start-up naming the key
(`nemo_aligner.config.load_config(raw, SFTRunConfig)`).
"""

from dataclasses import dataclass, field
from typing import Optional

from nemo_aligner.config.sections import (
    DataConfig, LoopConfig, ModelConfig, OptimConfig, RunConfig, TrainerConfig, _choice,
)

ROW_FORMATS = ("auto", "nemo_chat", "messages", "prompt_completion", "roll")
LOSS_ON = ("all_assistant", "last_assistant")
LOSS_NORMALIZATIONS = ("tokens", "sequences")


@dataclass
class SFTDataConfig(DataConfig):
    """model.data for SFT: files, row shape and key mapping, template, over-length policy, packing."""

    row_format: str = "auto"  # auto (detected per row) | nemo_chat | messages | prompt_completion | roll
    system_key: Optional[str] = "system"  # ROLL rows: system prompt column (absent or empty = no system turn)
    prompt_key: str = "instruction"  # ROLL rows: the user turn
    query_key: Optional[str] = "input"  # ROLL rows: appended to the user turn after a newline when non-empty
    response_key: str = "output"  # ROLL rows: the assistant turn (trained on)
    loss_on: str = "all_assistant"  # all_assistant | last_assistant: which assistant turns carry labels
    chat: Optional[bool] = None  # kept for NeMo command lines: the row shape is detected per row
    # pack_size (online packing): null = seq_length, the longest padded row there could be

    def __post_init__(self):
        super().__post_init__()
        _choice("model.data.data_impl", self.data_impl, ("jsonl", "parquet"))
        _choice("model.data.row_format", self.row_format, ROW_FORMATS)
        _choice("model.data.loss_on", self.loss_on, LOSS_ON)


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


def _sft_loop() -> LoopConfig:
    return LoopConfig(val_check_interval=100, save_interval=100)  # NeMo-Aligner's gpt_sft.yaml


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=3e-5, weight_decay=0.01)  # NeMo-Aligner's gpt_sft.yaml


@dataclass
class SFTTrainerConfig(TrainerConfig):
    sft: LoopConfig = field(default_factory=_sft_loop)


@dataclass
class SFTModelConfig(ModelConfig):
    global_batch_size: int = 128  # NeMo-Aligner's gpt_sft.yaml (DPO: 64)
    optim: OptimConfig = field(default_factory=_sft_optim)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.data.packing and self.data.pack_size is not None and self.data.pack_size < self.seq_length:
            raise ValueError(f"model.data.pack_size={self.data.pack_size} < seq_length ({self.seq_length}, from "
                             "model.data.seq_length or model.encoder_seq_length): every example must fit in one pack; "
                             f"use model.data.pack_size >= {self.seq_length} or null")


@dataclass
class SFTRunConfig(RunConfig):
    """The whole of gpt_sft.yaml."""

    name: str = "megatron_gpt_sft"  # the run's name (NeMo's)
    trainer: SFTTrainerConfig = field(default_factory=SFTTrainerConfig)
    model: SFTModelConfig = field(default_factory=SFTModelConfig)
