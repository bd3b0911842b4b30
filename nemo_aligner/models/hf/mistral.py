"""Mistral: Llama's layout without biases, with an optional sliding attention window."""

from nemo_aligner.models.hf.family import LLAMA_LAYER_MAP, HFFamily, require
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf


class MistralFamily(HFFamily):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    name_map = LLAMA_LAYER_MAP

    def config_from_hf(self, hf, source):
        return llama_like_config(hf, source, sliding_window=hf.get("sliding_window"))

    def config_to_hf(self, cfg):
        require(cfg, "mistral", add_qkv_bias=False, add_bias_linear=False)
        return {**llama_like_config_to_hf(cfg, "mistral"), "sliding_window": cfg.sliding_window}
