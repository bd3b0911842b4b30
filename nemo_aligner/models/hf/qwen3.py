"""Qwen3: Llama's layout with an RMSNorm on each query and key head before RoPE, no biases, a head_dim
of its own, and optional sliding-window layers (`use_sliding_window`, `max_window_layers` / `layer_types`)."""

from nemo_aligner.models.hf.family import (
    LLAMA_LAYER_MAP, QK_NORM_MAP, HFFamily, layer_types_from_hf, layer_types_to_hf, refuse, require,
)
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf

# transformers' Qwen3Config defaults for the keys a config.json may leave out
HF_DEFAULTS = {"head_dim": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "use_sliding_window": False,
               "sliding_window": 4096, "max_window_layers": 28, "max_position_embeddings": 32768}


class Qwen3Family(HFFamily):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    name_map = LLAMA_LAYER_MAP + QK_NORM_MAP
    hf_defaults = HF_DEFAULTS

    def config_from_hf(self, hf, source):
        refuse(hf, source, ["attention_bias"], " (biases on q/k/v and o, none in the MLP)")
        window, layer_types = _sliding_layers(hf, source)
        return llama_like_config(hf, source, qk_norm="head", sliding_window=window, layer_types=layer_types)

    def config_to_hf(self, cfg):
        require(cfg, "qwen3", qk_norm="head", add_qkv_bias=False, add_bias_linear=False)
        types = layer_types_to_hf(cfg)
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        return {**llama_like_config_to_hf(cfg, "qwen3", allow=("qk_norm", "layer_types")), "attention_bias": False,
                "use_sliding_window": bool(sliding), "sliding_window": cfg.sliding_window if sliding else None,
                "max_window_layers": sliding[0] if sliding else cfg.num_layers, "layer_types": types}


def _sliding_layers(hf: dict, source: str):
    """(sliding_window, layer_types) as Qwen3Config derives them: no window unless use_sliding_window; then the
    layers from max_window_layers on slide, unless layer_types lists them."""
    num_layers = hf["num_hidden_layers"]
    if not hf["use_sliding_window"] or hf["sliding_window"] is None:
        return None, None
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf["max_window_layers"] else "full_attention"
                                      for i in range(num_layers)]
    layer_types = layer_types_from_hf(types, num_layers, source)
    return (hf["sliding_window"], layer_types) if "sliding" in layer_types else (None, None)
