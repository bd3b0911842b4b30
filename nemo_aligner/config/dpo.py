"""The DPO run config (examples/nlp/gpt/conf/gpt_dpo.yaml): the shared sections plus trainer.dpo,
the preference data section and model.dpo, with NeMo-Aligner's key names.

Unknown keys and wrong types fail at start-up naming the key (`nemo_aligner.config.load_config`).
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from nemo_aligner.config.sections import DataConfig, LoopConfig, ModelConfig, RunConfig, TrainerConfig, _choice


@dataclass
class PreferenceDataConfig(DataConfig):
    """model.data for preference pairs (DPO): files, column names, default rewards, packing."""

    data_impl: str = "jsonl"  # jsonl | parquet | packed_jsonl (files from prepare_packed_dpo_dataset.py; encoder_seq_length = pack size)
    default_chosen_reward: float = 1.0  # used by rpo_* when a row has no chosen_reward
    default_rejected_reward: float = 0.0
    prompt_key: Optional[str] = None  # column names; null = detect (prompt / instruction)
    chosen_key: Optional[str] = None  # null = detect (chosen_response / chosen)
    rejected_key: Optional[str] = None  # null = detect (rejected_response / rejected)
    input_key: str = "input"  # ROLL's optional field appended to a string prompt
    shared_prompt: bool = True  # one row [prompt | chosen | rejected] per pair, responses masked from each other (exact; off = two sequences)
    # pack_size (online packing): null = 2 x seq_length, a pair of two max-length sequences

    def __post_init__(self):
        super().__post_init__()
        _choice("model.data.data_impl", self.data_impl, ("jsonl", "packed_jsonl", "parquet"))


@dataclass
class DPOConfig:
    """model.dpo: the preference loss and the reference policy."""

    ref_policy_kl_penalty: float = 0.2  # beta
    preference_loss: Any = "dpo"  # a loss name or a list of names (weighted by preference_loss_weights); see losses/preference.py
    preference_loss_weights: Optional[list] = None  # weights when preference_loss is a list
    preference_average_log_probs: bool = False  # divide each log-prob sum by its response-token count
    sft_average_log_probs: Optional[bool] = None  # null = preference_average_log_probs
    gt_reward_scale: float = 1.0  # scale of (chosen_reward - rejected_reward) in rpo_* losses
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    label_smoothing: float = 0.0  # cDPO epsilon (dpo/sigmoid), robust's epsilon
    loss_kwargs: dict = field(default_factory=dict)  # extra loss parameters, e.g. {simpo_gamma: 0.5}
    ref_mode: Optional[str] = None  # precompute (cached log-probs) | online (frozen copy) | adapter (LoRA off); null = adapter with LoRA, else precompute
    ref_cache_dir: Optional[str] = None  # where precomputed log-probs are cached; null = <log_dir>/ref_logps
    log_prob_forward_micro_batch_size: Optional[int] = None  # items per forward when precomputing; null = micro_batch_size
    logprob_chunk_size: int = 1024  # tokens per chunk of the output projection (memory vs speed)

    def __post_init__(self):
        _choice("model.dpo.ref_mode", self.ref_mode, (None, "precompute", "online", "adapter"))
        if self.preference_loss_weight == 0 and self.sft_loss_weight == 0:
            raise ValueError("model.dpo.preference_loss_weight and model.dpo.sft_loss_weight are both 0; "
                             "at least one must be non-zero")
        if self.ref_policy_kl_penalty <= 0:
            raise ValueError(f"model.dpo.ref_policy_kl_penalty={self.ref_policy_kl_penalty}; expected > 0")
        if self.logprob_chunk_size <= 0:
            raise ValueError(f"model.dpo.logprob_chunk_size={self.logprob_chunk_size}; expected a positive integer")


@dataclass
class DPOTrainerConfig(TrainerConfig):
    dpo: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class DPOModelConfig(ModelConfig):
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.dpo.ref_mode == "adapter" and self.peft.peft_scheme != "lora":
            raise ValueError("model.dpo.ref_mode=adapter needs model.peft.peft_scheme=lora (the reference is the "
                             "model with its adapters off); use precompute or online")
        if self.data.packing and self.data.pack_size is not None and self.data.pack_size < 2 * self.seq_length:
            raise ValueError(f"model.data.pack_size={self.data.pack_size} < 2 x seq_length ({self.seq_length}, from "
                             "model.data.seq_length or model.encoder_seq_length): a pair of two max-length sequences "
                             f"must fit in one pack; use model.data.pack_size >= {2 * self.seq_length} or null")

    @property
    def ref_mode(self) -> str:
        """model.dpo.ref_mode resolved: null means adapter with LoRA, else precompute."""
        return self.dpo.ref_mode or ("adapter" if self.peft.peft_scheme == "lora" else "precompute")


@dataclass
class DPORunConfig(RunConfig):
    """The whole of gpt_dpo.yaml."""

    name: str = "megatron_gpt_dpo"
    trainer: DPOTrainerConfig = field(default_factory=DPOTrainerConfig)
    model: DPOModelConfig = field(default_factory=DPOModelConfig)
