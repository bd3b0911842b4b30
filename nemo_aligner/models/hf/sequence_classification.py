"""Hugging Face `<Family>ForSequenceClassification` checkpoints (reward models) for every family, in and out.

transformers' layout is the causal LM's base weights (`model.*`, GPT-2's `transformer.*`) plus
`score.weight` [num_labels, hidden], no bias and no `lm_head`; config.json names the architecture,
`id2label` with one entry (num_labels 1) and `pad_token_id` (transformers scores the last token that
is not pad_token_id). A `ScoreModel` keeps the head as its output layer (`output_layer.weight`), so a
family's own name map converts everything else and this file only adds the head.

Loading a causal-LM checkpoint as a score model skips `lm_head.weight` and starts a fresh head
(`models.score.fresh_score_weight`, logged).
"""

import logging

from nemo_aligner.models.score import SCORE_WEIGHT, ScoreModel, fresh_score_weight

log = logging.getLogger("nemo_aligner")

HF_SCORE = "score.weight"
# model_type -> transformers' class (tests check it against AutoModelForSequenceClassification's mapping)
ARCHITECTURES = {
    "llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification", "qwen3": "Qwen3ForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification", "olmo2": "Olmo2ForSequenceClassification",
    "gpt2": "GPT2ForSequenceClassification",
}


class SequenceClassificationNames:
    """A family's tensor names for its sequence-classification model: the family's map plus the head."""

    def __init__(self, family):
        if family.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {family.model_type!r} has no sequence-classification layout here; "
                             f"supported: {sorted(ARCHITECTURES)}")
        self.family = family
        self.model_type = family.model_type
        self.architecture = ARCHITECTURES[family.model_type]

    def is_ignored(self, hf_name: str) -> bool:
        # a causal LM's projection is not part of a score model (a fresh head replaces it)
        return hf_name == "lm_head.weight" or self.family.is_ignored(hf_name)

    def from_hf(self, hf_tensors, config=None):
        rest = dict(hf_tensors)
        score = rest.pop(HF_SCORE, None)
        ours, sources = self.family.from_hf(rest, config)
        if score is not None:
            ours[SCORE_WEIGHT], sources[SCORE_WEIGHT] = score, HF_SCORE
        return ours, sources

    def to_hf(self, our_tensors):
        rest = dict(our_tensors)
        score = rest.pop(SCORE_WEIGHT, None)
        out = self.family.to_hf(rest)
        if score is not None:
            out[HF_SCORE] = score
        return out


def config_keys(model_type: str, pad_token_id: int | None) -> dict:
    """config.json keys of a one-score sequence classifier (what transformers writes for num_labels=1)."""
    if pad_token_id is None:
        raise ValueError("a sequence-classification export needs pad_token_id (transformers finds the scored "
                         "token from it); export with a tokenizer or set the model's pad_token_id")
    return {"architectures": [ARCHITECTURES[model_type]], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
            "pad_token_id": pad_token_id}


def check_num_labels(hf: dict, source: str) -> None:
    """A reward model has one score: refuse a classifier with more labels (config.json's id2label / num_labels)."""
    labels = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels")
    architectures = hf.get("architectures") or []
    if labels not in (None, 1) and any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"{source}: a sequence classifier with {labels} labels; a reward model has one score "
                         "(num_labels=1)")


def fill_fresh_head(model: ScoreModel, tensors: dict, sources: dict, seed: int, path) -> None:
    """A causal-LM checkpoint loaded as a score model: its stage with the head gets a fresh one (logged)."""
    if model.output_layer is None or SCORE_WEIGHT in tensors:
        return
    std = model.config.init_method_std
    dtype = next(t.dtype for t in tensors.values()) if tensors else None
    tensors[SCORE_WEIGHT] = fresh_score_weight(model.config.hidden_size, std, seed, dtype or model.output_layer.weight.dtype)
    sources[SCORE_WEIGHT] = HF_SCORE
    log.info("%s has no score.weight (a causal-LM checkpoint): the reward head starts fresh, N(0, %g) from "
             "model.seed=%d", path, std, seed)
