"""Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text: Gemma 3 270M / 1B): Gemma 2's layout plus an
RMSNorm (x * (1 + w)) on each query and key head, its own RoPE base for the sliding-window layers, the
layer pattern from `layer_types` or `sliding_window_pattern`, and no attention soft-capping.

RoPE comes nested per layer type (`rope_parameters: {full_attention: {...}, sliding_attention: {...}}`)
or, in older configs, as rope_theta / rope_scaling (global layers) and rope_local_base_freq (sliding).
"""

import logging

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.family import QK_NORM_MAP, HFFamily, require, rope_from_hf, rope_to_hf
from nemo_aligner.models.hf.gemma2 import GEMMA_NAME_MAP, gemma_config, gemma_config_to_hf

log = logging.getLogger("nemo_aligner")

# transformers' Gemma3TextConfig defaults for the keys a config.json may leave out
HF_DEFAULTS = {"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "final_logit_softcapping": None, "sliding_window_pattern": 6, "max_position_embeddings": 131072,
               "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0}
MULTIMODAL = ("model_type 'gemma3' (Gemma3ForConditionalGeneration, the multimodal Gemma 3 4B and larger) is not "
              "supported; only the text-only model_type 'gemma3_text' (Gemma3ForCausalLM: Gemma 3 270M, 1B) is")


class Gemma3TextFamily(HFFamily):
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    name_map = GEMMA_NAME_MAP + QK_NORM_MAP
    hf_defaults = HF_DEFAULTS

    def config_from_hf(self, hf, source):
        if hf.get("attn_logit_softcapping") is not None:  # transformers' Gemma 3 attention never applies it
            log.warning("%s: attn_logit_softcapping=%s ignored, as transformers' Gemma 3 ignores it", source,
                        hf["attn_logit_softcapping"])
        pattern = hf["sliding_window_pattern"]
        return gemma_config(hf, source, lambda n: ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                                   for i in range(n)], qk_norm="head", rope=_rope_from_hf(hf, source))

    def config_to_hf(self, cfg):
        require(cfg, "gemma3_text", qk_norm="head", attn_logit_softcapping=None)
        return {**gemma_config_to_hf(cfg, "gemma3_text", allow=("qk_norm", "rotary_base_local")),
                "attn_logit_softcapping": None, **_rope_to_hf(cfg)}


def _rope_from_hf(hf: dict, source: str) -> dict:
    params = hf.get("rope_parameters") or {}
    nested = "full_attention" in params or "sliding_attention" in params
    # older configs: rope_scaling (global layers) with rope_theta, and rope_local_base_freq
    full = (params.get("full_attention") if nested else hf.get("rope_scaling") or params) or {}
    local = (params.get("sliding_attention") if nested else None) or {}
    full = {"rope_theta": hf["rope_theta"], **full}
    local = {"rope_theta": hf["rope_local_base_freq"], **local}
    if local.get("rope_type", local.get("type", "default")) != "default":
        raise ValueError(f"{source}: rope_parameters.sliding_attention rope type "
                         f"{local.get('rope_type', local.get('type'))!r} is not supported; supported: default")
    return {**rope_from_hf({"rope_parameters": full}, source), "rotary_base_local": float(local["rope_theta"])}


def _rope_to_hf(cfg: GPTConfig) -> dict:
    """Nested rope_parameters (transformers 5) and the older rope_theta / rope_scaling / rope_local_base_freq."""
    plain = rope_to_hf(cfg)
    local_base = cfg.rotary_base_local if cfg.rotary_base_local is not None else cfg.rotary_base
    nested = {"full_attention": plain["rope_parameters"],
              "sliding_attention": {"rope_type": "default", "rope_theta": local_base}}
    return {**plain, "rope_parameters": nested, "rope_local_base_freq": local_base}
