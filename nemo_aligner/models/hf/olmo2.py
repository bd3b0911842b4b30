"""OLMo 2: post-norm placement (an RMSNorm on the attention output and on the MLP output, before each
residual add, none before the sublayers) and RMSNorm over the whole query / key projection before RoPE."""

from nemo_aligner.models.hf.family import (
    EMBEDDING_MAP, PROJECTION_MAP, QK_NORM_MAP, HFFamily, refuse, require,
)
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf

NAME_MAP = EMBEDDING_MAP + PROJECTION_MAP + QK_NORM_MAP + [
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.attention_output_norm.weight"),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.{i}.mlp_output_norm.weight"),
]
# transformers' Olmo2Config defaults for the keys a config.json may leave out
HF_DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 2048}


class Olmo2Family(HFFamily):
    model_type = "olmo2"
    architecture = "Olmo2ForCausalLM"
    name_map = NAME_MAP
    hf_defaults = HF_DEFAULTS

    def config_from_hf(self, hf, source):
        refuse(hf, source, ["attention_bias"], " (biases on q/k/v and o, none in the MLP)")
        return llama_like_config(hf, source, norm_placement="post", qk_norm="full")

    def config_to_hf(self, cfg):
        require(cfg, "olmo2", norm_placement="post", qk_norm="full", add_qkv_bias=False, add_bias_linear=False,
                sliding_window=None)
        return {**llama_like_config_to_hf(cfg, "olmo2", allow=("norm_placement", "qk_norm")), "attention_bias": False}
