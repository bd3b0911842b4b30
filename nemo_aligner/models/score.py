"""Score models: a GPTModel whose output layer is a scalar head (hidden -> 1, no bias), the layout of
Hugging Face's `<Family>ForSequenceClassification` with `num_labels=1` (its `score` Linear). Reward models
train it; PPO's critic (a value per token, initialised from a reward model) reads the same head at every
response position.

`ScoreModel.output_layer` is the score head: keeping the output projection's name means pipeline
stages, FSDP units, checkpoints and the export find it where they find an LM's output layer (last
stage, root unit); only the tensor-parallel plan differs (`vocab_parallel_output = False`: the head
is replicated, not sharded over a vocabulary). `ScoreHead` is how the model's forward ends in training
(`models.heads.ModelWithHead`): a score at *every* position, [R, T] fp32, a fixed shape pipeline stages
can send. Which position counts is data: a reward model reads each sequence's last non-pad token
(`data.scores`), a critic every response token.

A fresh head (a causal-LM checkpoint loaded as a score model, or a model built from scratch) starts as
N(0, init_method_std) — transformers' and Megatron's init of a new output layer — seeded by model.seed.

Shapes: R rows, T tokens, E hidden.
"""

import torch
import torch.nn.functional as F
from torch import nn

from nemo_aligner.models.gpt import GPTConfig, GPTModel

CAUSAL_LM = "causal_lm"
SEQUENCE_CLASSIFICATION = "sequence_classification"
SCORE_WEIGHT = "output_layer.weight"  # our name of the head's weight; Hugging Face's is `score.weight`
HEAD_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, None: None}


def fresh_score_weight(hidden_size: int, std: float, seed: int, dtype=torch.float32) -> torch.Tensor:
    """[1, E] N(0, std) from its own generator: every rank draws the same head, whatever the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, hidden_size, generator=generator, dtype=torch.float32).mul_(std).to(dtype)


class ScoreModel(GPTModel):
    """GPTModel with a scalar score head instead of the LM output layer (no [V, E] projection at all).

    pad_token_id: the id the Hugging Face export writes to config.json (transformers finds the scored
    token as the last one that is not pad_token_id); None = the tokenizer's, given at export."""

    vocab_parallel_output = False  # tensor parallel leaves the [1, E] head replicated

    def __init__(self, config: GPTConfig, pad_token_id: int | None = None):
        super().__init__(config)
        self.output_layer = nn.Linear(config.hidden_size, 1, bias=False)
        nn.init.normal_(self.output_layer.weight, mean=0.0, std=config.init_method_std)
        self.pad_token_id = pad_token_id

    def logits(self, input_ids, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Scores at every position [B, T] (no soft-capping: transformers' score head has none)."""
        hidden_BTE = self(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        return F.linear(hidden_BTE, self.output_layer.weight).squeeze(-1)


MODEL_CLASSES = {CAUSAL_LM: GPTModel, SEQUENCE_CLASSIFICATION: ScoreModel}


def model_class(task: str):
    if task not in MODEL_CLASSES:
        raise ValueError(f"task={task!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[task]


def is_score_model(model) -> bool:
    return isinstance(model, ScoreModel)


def train_score_head(model) -> None:
    """The head trains whatever else is frozen (LoRA: PEFT's modules_to_save=["score"]); a pipeline stage
    without it has nothing to do."""
    if is_score_model(model) and model.output_layer is not None:
        model.output_layer.requires_grad_(True)


def saved_with_adapters(model) -> set[str]:
    """Tensors (our names) a LoRA export writes beside the adapters: a score model's head."""
    return {SCORE_WEIGHT} if is_score_model(model) and model.output_layer is not None else set()


class ScoreHead(nn.Module):
    """forward(hidden [R, T, E], score weight [1, E], labels [R, T] (unused)) -> scores [R, T] fp32.

    No parameters: the weight is the model's output layer, passed in by ModelWithHead (so FSDP gathers
    it with the root unit). head_dtype: the projection's dtype whatever the autocast (NeMo-Aligner's
    model.force_head_dtype, float32 by default); None = the autocast's / parameters' dtype."""

    def __init__(self, head_dtype: torch.dtype | None = torch.float32):
        super().__init__()
        self.head_dtype = head_dtype

    def forward(self, hidden_RTE, weight_1E, labels_RT=None):
        if self.head_dtype is None:
            return F.linear(hidden_RTE, weight_1E).squeeze(-1).float()
        with torch.autocast(hidden_RTE.device.type, enabled=False):
            return F.linear(hidden_RTE.to(self.head_dtype), weight_1E.to(self.head_dtype)).squeeze(-1).float()

    @staticmethod
    def output_trailing_shape() -> tuple:
        return ()

    @staticmethod
    def output_dtype() -> torch.dtype:
        return torch.float32
