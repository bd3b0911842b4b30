"""The interface every Hugging Face family implements: config translation plus a tensor name map."""

import dataclasses
import json
import re
from abc import ABC, abstractmethod

import torch

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.common import compile_name_map, rename

# Names shared by every Llama-style family (HF name, our name): embeddings, final norm, output layer ...
EMBEDDING_MAP = [
    ("model.embed_tokens.weight", "embedding.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "output_layer.weight"),
]
# ... the attention and MLP projections ...
PROJECTION_MAP = [
    (f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"layers.{{i}}.self_attention.{p}_proj.{kind}")
    for p in ("q", "k", "v", "o") for kind in ("weight", "bias")
] + [
    (f"model.layers.{{i}}.mlp.{p}_proj.{kind}", f"layers.{{i}}.mlp.{p}_proj.{kind}")
    for p in ("gate", "up", "down") for kind in ("weight", "bias")
]
# ... per-layer q/k norms (Qwen3, Gemma 3, OLMo 2) ...
QK_NORM_MAP = [(f"model.layers.{{i}}.self_attn.{p}_norm.weight", f"layers.{{i}}.self_attention.{p}_norm.weight")
               for p in ("q", "k")]
# ... and the pre-norms of Llama's layout (its post_attention_layernorm is the norm before the MLP).
PRE_NORM_MAP = [
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
]
LLAMA_LAYER_MAP = EMBEDDING_MAP + PRE_NORM_MAP + PROJECTION_MAP

# transformers' layer_types entries <-> ours (GPTConfig.layer_types)
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}

# Architecture options only some families have: every family's export requires the others at their defaults.
FEATURE_KEYS = ("layer_types", "qk_norm", "norm_placement", "layernorm_zero_centered_gamma", "embedding_multiplier",
                "softmax_scale", "attn_logit_softcapping", "final_logit_softcapping", "rotary_base_local",
                "rotary_percent", "rope_short_factor", "rope_long_factor", "rope_attention_factor")


class HFFamily(ABC):
    """Declarative import/export for one `model_type`; subclasses set the maps and config translation."""

    model_type: str = ""
    architecture: str = ""
    name_map: list[tuple[str, str]] = []
    ignored_hf_names: tuple[str, ...] = ()  # regexes of non-weight buffers some checkpoints carry
    hf_defaults: dict = {}  # transformers' config-class defaults for keys a config.json may leave out

    def __init__(self):
        self._hf_to_ours, self._ours_to_hf = compile_name_map(self.name_map)

    def read_config(self, hf: dict, source: str) -> GPTConfig:
        """config.json (read from `source`) -> our config, with this family's defaults for missing keys."""
        return self.config_from_hf({**self.hf_defaults, **hf}, source)  # explicit nulls in config.json kept

    @abstractmethod
    def config_from_hf(self, hf: dict, source: str) -> GPTConfig:
        """Translate config.json (read from `source`) into our config; unsupported settings raise."""

    @abstractmethod
    def config_to_hf(self, cfg: GPTConfig) -> dict:
        """config.json keys for `cfg`; raises when the architecture is not expressible in this family."""

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(pattern, hf_name) for pattern in self.ignored_hf_names)

    def from_hf(self, hf_tensors: dict[str, torch.Tensor],
                config: GPTConfig | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """HF tensors -> (our tensors, our name -> HF source name). Unknown names raise KeyError(name).

        config: the model's, for families whose fused tensors split by head counts (Phi-3)."""
        ours, sources = {}, {}
        for hf_name, tensor in hf_tensors.items():
            name = rename(hf_name, self._hf_to_ours)
            if name is None:
                raise KeyError(hf_name)
            ours[name], sources[name] = tensor, hf_name
        return ours, sources

    def to_hf(self, our_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, tensor in our_tensors.items():
            hf_name = rename(name, self._ours_to_hf)
            if hf_name is None:
                raise KeyError(name)
            out[hf_name] = tensor
        return out


def require(cfg: GPTConfig, model_type: str, **expected):
    """Fail export when the model's architecture cannot be written as `model_type`."""
    for key, value in expected.items():
        if getattr(cfg, key) != value:
            raise ValueError(f"cannot export as model_type={model_type!r}: model.{key}={getattr(cfg, key)!r}, "
                             f"expected {value!r}")


def require_plain(cfg: GPTConfig, model_type: str, allow=()):
    """Fail export when `cfg` uses an architecture option (FEATURE_KEYS, longrope) `model_type` lacks."""
    defaults = {f.name: f.default for f in dataclasses.fields(GPTConfig)}
    require(cfg, model_type, **{key: defaults[key] for key in FEATURE_KEYS if key not in allow})
    if cfg.rope_scaling == "longrope" and "rope_short_factor" not in allow:
        raise ValueError(f"cannot export as model_type={model_type!r}: model.rope_scaling='longrope' (phi3 only)")


def refuse(hf: dict, source: str, keys, why: str = "") -> None:
    """A ValueError naming config.json and the first of `keys` that is set (true / non-empty)."""
    for key in keys:
        if hf.get(key):
            raise ValueError(f"{source}: {key}={json.dumps(hf[key])} is not supported for model_type "
                             f"{hf.get('model_type')!r}{why}")


def layer_types_from_hf(types, num_layers: int, source: str) -> tuple[str, ...]:
    if len(types) != num_layers or set(types) - set(HF_LAYER_TYPES):
        raise ValueError(f"{source}: layer_types={list(types)}; expected num_hidden_layers={num_layers} entries, each "
                         f"one of {sorted(HF_LAYER_TYPES)}")
    return tuple(HF_LAYER_TYPES[t] for t in types)


def layer_types_to_hf(cfg: GPTConfig) -> list[str]:
    return ["sliding_attention" if cfg.is_sliding(i) else "full_attention" for i in range(cfg.num_layers)]


def rope_from_hf(hf: dict, source: str) -> dict:
    """GPTConfig rope keys from either transformers>=5 `rope_parameters` or the older rope_theta/rope_scaling."""
    params = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}), "rope_theta": hf.get("rope_theta", 10000.0)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    out = {"rotary_base": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    if rope_type == "default":
        return out
    if rope_type == "linear":
        return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(params["factor"])}
    if rope_type == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_position_embeddings": int(params["original_max_position_embeddings"])}
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported; supported: default, linear, llama3")


def rope_to_hf(cfg: GPTConfig) -> dict:
    """Both spellings, so transformers 4.x and 5.x (and other readers of config.json) agree."""
    scaling = None
    if cfg.rope_scaling == "linear":
        scaling = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
    elif cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_position_embeddings}
    parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rotary_base}
    return {"rope_theta": cfg.rotary_base, "rope_scaling": scaling, "rope_parameters": parameters}
