"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's layout with fused projections, split into ours on import and fused
back on export: `self_attn.qkv_proj` holds [q; k; v] and `mlp.gate_up_proj` [gate; up], stacked by rows.

RoPE is plain or LongRoPE (`longrope`, formerly `su`; transformers also maps `yarn` to it for Phi-3),
optionally partial (`partial_rotary_factor`). A sliding window, when set, applies to every layer.
"""

import torch

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.family import EMBEDDING_MAP, PRE_NORM_MAP, HFFamily, require
from nemo_aligner.models.hf.llama import llama_like_config, llama_like_config_to_hf

NAME_MAP = EMBEDDING_MAP + PRE_NORM_MAP + [
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.self_attention.o_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
]
# fused HF module (after the layer index) -> (our parent module, our projections in row order)
FUSED = {"self_attn.qkv_proj": ("self_attention", ("q_proj", "k_proj", "v_proj")),
         "mlp.gate_up_proj": ("mlp", ("gate_proj", "up_proj"))}
# transformers' Phi3Config defaults for the keys a config.json may leave out
HF_DEFAULTS = {"rms_norm_eps": 1e-5, "tie_word_embeddings": False, "max_position_embeddings": 4096,
               "original_max_position_embeddings": 4096, "sliding_window": None}
PHI3_FEATURES = ("rotary_percent", "rope_short_factor", "rope_long_factor", "rope_attention_factor")


def fused_row_sizes(cfg: GPTConfig, fused: str) -> list[int]:
    """Rows of each of our projections inside one fused HF weight."""
    if fused == "self_attn.qkv_proj":
        return [cfg.num_attention_heads * cfg.kv_channels] + [cfg.num_query_groups * cfg.kv_channels] * 2
    return [cfg.ffn_hidden_size] * 2


def split_fused(name: str, tensor: torch.Tensor, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """`model.layers.3.self_attn.qkv_proj.weight` -> {`layers.3.self_attention.q_proj.weight`: ..., ...}."""
    layer, fused = name.split(".")[2], name.split(".", 3)[3].rsplit(".", 1)[0]
    parent, leaves = FUSED[fused]
    sizes = fused_row_sizes(cfg, fused)
    if tensor.shape[0] != sum(sizes):
        raise ValueError(f"tensor {name!r} has {tensor.shape[0]} rows but config.json implies {sum(sizes)} "
                         f"({' + '.join(map(str, sizes))} for {', '.join(leaves)})")
    return {f"layers.{layer}.{parent}.{leaf}.weight": part for leaf, part in zip(leaves, tensor.split(sizes))}


def fuse(our_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pops every layer's q/k/v and gate/up weights from `our_tensors`; returns the fused HF tensors."""
    out = {}
    for fused, (parent, leaves) in FUSED.items():
        for name in [n for n in our_tensors if n.endswith(f".{parent}.{leaves[0]}.weight")]:
            layer = name.split(".")[1]
            parts = [our_tensors.pop(f"layers.{layer}.{parent}.{leaf}.weight") for leaf in leaves]
            out[f"model.layers.{layer}.{fused}.weight"] = torch.cat(parts, dim=0)
    return out


class Phi3Family(HFFamily):
    model_type = "phi3"
    architecture = "Phi3ForCausalLM"
    name_map = NAME_MAP
    hf_defaults = HF_DEFAULTS

    def config_from_hf(self, hf, source):
        return llama_like_config(hf, source, sliding_window=hf["sliding_window"], rope=_rope_from_hf(hf, source))

    def config_to_hf(self, cfg):
        require(cfg, "phi3", add_qkv_bias=False, add_bias_linear=False)
        if cfg.rope_scaling not in ("none", "longrope"):
            raise ValueError(f"cannot export as model_type='phi3': model.rope_scaling={cfg.rope_scaling!r}, expected "
                             "'none' or 'longrope'")
        # No tokenizer, no token ids: Phi3Config's default pad id (32000) would not fit a smaller vocabulary.
        return {**llama_like_config_to_hf(cfg, "phi3", allow=PHI3_FEATURES), **_rope_to_hf(cfg),
                "sliding_window": cfg.sliding_window, "pad_token_id": None, "bos_token_id": None,
                "eos_token_id": None}

    def from_hf(self, hf_tensors, config=None):
        assert config is not None, "phi3 splits its fused projections by the config's head counts"
        rest = dict(hf_tensors)
        fused = {n: rest.pop(n) for n in hf_tensors if n.rsplit(".", 1)[0].split(".", 3)[-1] in FUSED}
        ours, sources = super().from_hf(rest)
        for name, tensor in fused.items():
            for ours_name, part in split_fused(name, tensor, config).items():
                ours[ours_name], sources[ours_name] = part, name
        return ours, sources

    def to_hf(self, our_tensors):
        our_tensors = dict(our_tensors)
        fused = fuse(our_tensors)
        return {**super().to_hf(our_tensors), **fused}


def _rope_from_hf(hf: dict, source: str) -> dict:
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})  # Phi3Config: rope_scaling wins
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = "longrope" if rope_type in ("su", "yarn") else rope_type  # Phi3Config's own renaming
    out = {"rotary_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0))),
           "rotary_percent": float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))}
    if rope_type == "default":
        return out
    if rope_type != "longrope":
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported for phi3; supported: default, longrope")
    for key in ("short_factor", "long_factor"):
        if key not in params:
            raise ValueError(f"{source}: rope_scaling / rope_parameters of type longrope has no {key!r}")
    original = int(hf["original_max_position_embeddings"])  # the top-level key wins, as in transformers
    factor = params.get("factor")
    return {**out, "rope_scaling": "longrope", "rope_original_max_position_embeddings": original,
            "rope_scaling_factor": float(factor if factor is not None else hf["max_position_embeddings"] / original),
            "rope_short_factor": tuple(params["short_factor"]), "rope_long_factor": tuple(params["long_factor"]),
            "rope_attention_factor": params.get("attention_factor")}


def _rope_to_hf(cfg: GPTConfig) -> dict:
    """rope_parameters (transformers 5; Phi3Config prefers rope_scaling, so that holds the same dict)."""
    params = {"rope_type": "default", "rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_percent}
    longrope = cfg.rope_scaling == "longrope"
    if longrope:
        params.update(rope_type="longrope", short_factor=list(cfg.rope_short_factor),
                      long_factor=list(cfg.rope_long_factor), factor=cfg.rope_scaling_factor,
                      original_max_position_embeddings=cfg.rope_original_max_position_embeddings)
        if cfg.rope_attention_factor is not None:
            params["attention_factor"] = cfg.rope_attention_factor
    original = cfg.rope_original_max_position_embeddings if longrope else cfg.max_position_embeddings
    return {"rope_theta": cfg.rotary_base, "partial_rotary_factor": cfg.rotary_percent, "rope_parameters": params,
            "rope_scaling": params if longrope else None, "original_max_position_embeddings": original}
