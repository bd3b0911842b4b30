"""The reward-model run config (nemo_aligner/conf/training_rm.yaml): the shared sections plus
trainer.rm, the preference data section and the reward-model keys, with NeMo-Aligner's names
(`model.reward_model_type`, `model.force_head_dtype`, ...) and TRL's `center_rewards_coefficient`.

The defaults are NeMo-Aligner's training_rm.yaml where it has the key (max_epochs 1, val/save every
100 steps, micro 1 / global 64, lr 9e-6 with CosineAnnealing: the shared sections). Unknown keys and
wrong types fail at start-up naming the key (`nemo_aligner.config.load_config(raw, RMRunConfig)`).
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.config.sections import DataConfig, LoopConfig, ModelConfig, RunConfig, TrainerConfig, _choice

REWARD_MODEL_TYPES = ("binary_ranking", "regression")
HEAD_DTYPES = (None, "float32", "fp32", "bfloat16", "bf16")


@dataclass
class RewardDataConfig(DataConfig):
    """model.data for reward models: preference files (every DPO shape, NeMo-Aligner comparison files,
    NeMo-RL rows), column names, the margin column, packing."""

    data_impl: str = "jsonl"  # jsonl | parquet (read by file suffix either way)
    prompt_key: Optional[str] = None  # column names; null = detect (prompt / instruction)
    chosen_key: Optional[str] = None  # null = detect (chosen_response / chosen)
    rejected_key: Optional[str] = None  # null = detect (rejected_response / rejected)
    input_key: str = "input"  # ROLL's optional field appended to a string prompt
    margin_key: Optional[str] = "margin"  # per-pair margin column (Llama 2, TRL), used where a row has it; null = none
    # pack_size (online packing): null = 2 x seq_length, a pair of two max-length sequences

    def __post_init__(self):
        super().__post_init__()
        _choice("model.data.data_impl", self.data_impl, ("jsonl", "parquet"))


@dataclass
class RegressionConfig:
    """model.regression: NeMo-Aligner's attribute-regression head (reward_model_type=regression); kept so NeMo
    configs load, used by no supported type yet."""

    num_attributes: int = 1  # attribute heads (regression only)
    merge_attributes: bool = False  # regression only
    attribute_weights: Optional[list] = None  # regression only
    loss_mask_val: int = -100  # regression only
    load_rm_head_weights: bool = False  # regression only


@dataclass
class RewardLoopConfig(LoopConfig):
    """trainer.rm: NeMo-Aligner's training_rm.yaml cadence."""

    val_check_interval: Any = 100  # int = every N steps, float = fraction of an epoch (and always at the end)


@dataclass
class RMTrainerConfig(TrainerConfig):
    rm: RewardLoopConfig = field(default_factory=RewardLoopConfig)


@dataclass
class RewardModelConfig(ModelConfig):
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    reward_model_type: str = "binary_ranking"  # Bradley-Terry on (chosen, rejected) pairs; regression: not yet
    center_rewards_coefficient: Optional[float] = None  # TRL: adds c * (r_chosen + r_rejected)^2 per pair; null = off
    force_head_dtype: Optional[str] = "float32"  # dtype of the score projection whatever the autocast; null = model's
    output_sequence: bool = False  # NeMo: a score per token (critics); reward-model training reads one per sequence
    use_avg_pool: bool = False  # NeMo: average the scores over the sequence; only the last real token is supported
    regression: RegressionConfig = field(default_factory=RegressionConfig)

    def __post_init__(self):
        super().__post_init__()
        _choice("model.reward_model_type", self.reward_model_type, REWARD_MODEL_TYPES)
        if self.reward_model_type == "regression":
            raise ValueError("model.reward_model_type=regression (SteerLM attribute regression) is not supported "
                             "yet; use binary_ranking (chosen / rejected pairs)")
        _choice("model.force_head_dtype", self.force_head_dtype, HEAD_DTYPES)
        if self.output_sequence:
            raise ValueError("model.output_sequence=true (a score per token) is for critics; reward-model training "
                             "reads one score per sequence, at its last real token: set it to false")
        if self.use_avg_pool:
            raise ValueError("model.use_avg_pool=true is not supported: the score is read at each sequence's last "
                             "real token (as transformers' *ForSequenceClassification); set it to false")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ValueError(f"model.center_rewards_coefficient={self.center_rewards_coefficient}; expected >= 0 "
                             "or null")
        if self.data.packing and self.data.pack_size is not None and self.data.pack_size < 2 * self.seq_length:
            raise ValueError(f"model.data.pack_size={self.data.pack_size} < 2 x seq_length ({self.seq_length}, from "
                             "model.data.seq_length or model.encoder_seq_length): a pair of two max-length sequences "
                             f"must fit in one pack; use model.data.pack_size >= {2 * self.seq_length} or null")


@dataclass
class RMRunConfig(RunConfig):
    """The whole of training_rm.yaml."""

    name: str = "megatron_gpt_rm"  # the run's name (NeMo's)
    trainer: RMTrainerConfig = field(default_factory=RMTrainerConfig)
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
