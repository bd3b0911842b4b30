"""Gemma 2: GeGLU (tanh GELU), embeddings times sqrt(hidden), RMSNorm as x * (1 + w), norms before and
after attention and MLP, soft-capped attention scores and final logits, alternating sliding-window
and global layers, and scores scaled by query_pre_attn_scalar ** -0.5.

Also the translation Gemma 3 reuses (`gemma_config`, `gemma_config_to_hf`, `GEMMA_NAME_MAP`).
"""

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.family import (
    EMBEDDING_MAP, PROJECTION_MAP, HFFamily, layer_types_from_hf, layer_types_to_hf, refuse, require,
)
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf

# HF's Gemma layer norms -> ours: its post_attention_layernorm normalises the attention *output*.
GEMMA_NAME_MAP = EMBEDDING_MAP + PROJECTION_MAP + [
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attention_output_norm.weight"),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_output_norm.weight"),
]
# transformers' Gemma2Config defaults for the keys a config.json may leave out
HF_DEFAULTS = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "max_position_embeddings": 8192}
# what makes a Gemma a Gemma (GPTConfig keys), checked again on export
GEMMA_ARCHITECTURE = dict(norm_placement="sandwich", layernorm_zero_centered_gamma=True, add_qkv_bias=False,
                          add_bias_linear=False)
GEMMA_FEATURES = ("norm_placement", "layernorm_zero_centered_gamma", "embedding_multiplier", "softmax_scale",
                  "layer_types", "final_logit_softcapping")


def gemma_config(hf: dict, source: str, default_layer_types, **overrides) -> GPTConfig:
    """The keys Gemma 2 and 3 share; default_layer_types(num_layers) when config.json has no layer_types."""
    refuse(hf, source, ["attention_bias", "use_bidirectional_attention"])
    num_layers = hf["num_hidden_layers"]
    layer_types = layer_types_from_hf(hf.get("layer_types") or default_layer_types(num_layers), num_layers, source)
    return llama_like_config(
        hf, source, activation_key="hidden_activation", **GEMMA_ARCHITECTURE,
        embedding_multiplier=hf["hidden_size"] ** 0.5,  # transformers' own expression (bit-equal scale)
        softmax_scale=hf["query_pre_attn_scalar"] ** -0.5, sliding_window=hf["sliding_window"],
        layer_types=layer_types, final_logit_softcapping=hf["final_logit_softcapping"], **overrides,
    )


def gemma_config_to_hf(cfg: GPTConfig, model_type: str, allow=()) -> dict:
    require(cfg, model_type, **GEMMA_ARCHITECTURE, embedding_multiplier=cfg.hidden_size ** 0.5)
    return {**llama_like_config_to_hf(cfg, model_type, allow=GEMMA_FEATURES + tuple(allow),
                                      activation_key="hidden_activation"),
            "query_pre_attn_scalar": query_pre_attn_scalar(cfg, model_type), "sliding_window": cfg.sliding_window,
            "layer_types": layer_types_to_hf(cfg), "final_logit_softcapping": cfg.final_logit_softcapping,
            "attention_bias": False}


def query_pre_attn_scalar(cfg: GPTConfig, model_type: str) -> int:
    """The integer q with softmax_scale == q ** -0.5 exactly (transformers computes the scale that way)."""
    if cfg.softmax_scale is None:
        return cfg.kv_channels
    q = round(cfg.softmax_scale ** -2)
    if q < 1 or q ** -0.5 != cfg.softmax_scale:
        raise ValueError(f"cannot export as model_type={model_type!r}: model.softmax_scale={cfg.softmax_scale} is "
                         "not query_pre_attn_scalar ** -0.5 for an integer query_pre_attn_scalar")
    return q


def alternating_layers(num_layers: int) -> list[str]:
    """Gemma 2's default: sliding, global, sliding, global, ..."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]


class Gemma2Family(HFFamily):
    model_type = "gemma2"
    architecture = "Gemma2ForCausalLM"
    name_map = GEMMA_NAME_MAP
    hf_defaults = HF_DEFAULTS

    def config_from_hf(self, hf, source):
        return gemma_config(hf, source, alternating_layers, attn_logit_softcapping=hf["attn_logit_softcapping"])

    def config_to_hf(self, cfg):
        require(cfg, "gemma2", qk_norm="none")
        return {**gemma_config_to_hf(cfg, "gemma2", allow=("attn_logit_softcapping",)),
                "attn_logit_softcapping": cfg.attn_logit_softcapping}
