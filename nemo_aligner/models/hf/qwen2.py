"""Qwen2 / Qwen2.5: Llama's layout with biases on the query/key/value projections only."""

from nemo_aligner.models.hf.family import LLAMA_LAYER_MAP, HFFamily, require
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf


class Qwen2Family(HFFamily):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    name_map = LLAMA_LAYER_MAP

    def config_from_hf(self, hf, source):
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true (per-layer windows) is not supported")
        return llama_like_config(hf, source, add_qkv_bias=True, add_bias_linear=False)

    def config_to_hf(self, cfg):
        require(cfg, "qwen2", add_qkv_bias=True, add_bias_linear=False, sliding_window=None)
        return {**llama_like_config_to_hf(cfg, "qwen2"), "use_sliding_window": False, "sliding_window": None}
