"""Llama (and the config translation the other Llama-style families reuse): RMSNorm, SwiGLU, RoPE, GQA."""

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.family import (
    LLAMA_LAYER_MAP, HFFamily, require, require_plain, rope_from_hf, rope_to_hf,
)

GATED_ACTIVATIONS = {"silu": "swiglu", "gelu": "geglu", "relu": "reglu", "gelu_pytorch_tanh": "geglu_tanh"}


def llama_like_config(hf: dict, source: str, activation_key: str = "hidden_act", rope: dict | None = None,
                      **overrides) -> GPTConfig:
    """The keys every Llama-style config.json shares; family-specific keys come in `overrides` (which win).

    activation_key: the config.json key of the gated MLP's activation (Gemma's is hidden_activation).
    rope: GPTConfig's rope keys when the family reads them itself (Gemma 3, Phi-3); else `rope_from_hf`."""
    act = hf.get(activation_key, "silu")
    if act not in GATED_ACTIVATIONS:
        raise ValueError(f"{source}: {activation_key}={act!r} is not supported; supported: {sorted(GATED_ACTIVATIONS)}")
    heads = hf["num_attention_heads"]
    keys = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        normalization="rmsnorm", layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), activation=GATED_ACTIVATIONS[act],
        position_embedding_type="rope", max_position_embeddings=hf.get("max_position_embeddings", 2048),
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        vocab_size=hf["vocab_size"], **(rope if rope is not None else rope_from_hf(hf, source)),
    )
    return GPTConfig(**{**keys, **overrides})


def llama_like_config_to_hf(cfg: GPTConfig, model_type: str, allow=(), activation_key: str = "hidden_act") -> dict:
    """allow: the FEATURE_KEYS `model_type` expresses (its own code writes them)."""
    require(cfg, model_type, normalization="rmsnorm", position_embedding_type="rope")
    require_plain(cfg, model_type, allow)
    act = {v: k for k, v in GATED_ACTIVATIONS.items()}.get(cfg.activation)
    if act is None:
        raise ValueError(f"cannot export as model_type={model_type!r}: model.activation={cfg.activation!r}, "
                         f"expected one of {sorted(GATED_ACTIVATIONS.values())}")
    return {
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups, "head_dim": cfg.kv_channels, activation_key: act,
        "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.layernorm_epsilon,
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights, "vocab_size": cfg.vocab_size,
        **rope_to_hf(cfg),
    }


class LlamaFamily(HFFamily):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    name_map = LLAMA_LAYER_MAP
    ignored_hf_names = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)

    def config_from_hf(self, hf, source):
        attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
        if attention_bias != mlp_bias:
            raise ValueError(f"{source}: attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported; "
                             "both must be equal")
        return llama_like_config(hf, source, add_qkv_bias=attention_bias, add_bias_linear=mlp_bias)

    def config_to_hf(self, cfg):
        if cfg.add_qkv_bias != cfg.add_bias_linear:
            raise ValueError(f"cannot export as model_type='llama': model.add_qkv_bias={cfg.add_qkv_bias} differs from "
                             f"model.add_bias_linear={cfg.add_bias_linear} (use qwen2 for qkv-only bias)")
        require(cfg, "llama", sliding_window=None)
        return {**llama_like_config_to_hf(cfg, "llama"), "attention_bias": cfg.add_qkv_bias,
                "mlp_bias": cfg.add_bias_linear}
