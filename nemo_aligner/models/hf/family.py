"""The interface every Hugging Face family implements: config translation plus a tensor name map."""

import re
from abc import ABC, abstractmethod

import torch

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.common import compile_name_map, rename

# Layers of the decoder shared by every Llama-style family (HF name, our name).
LLAMA_LAYER_MAP = [
    ("model.embed_tokens.weight", "embedding.weight"),
    ("model.norm.weight", "final_norm.weight"),
    ("lm_head.weight", "output_layer.weight"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.weight"),
] + [
    (f"model.layers.{{i}}.self_attn.{p}_proj.{kind}", f"layers.{{i}}.self_attention.{p}_proj.{kind}")
    for p in ("q", "k", "v", "o") for kind in ("weight", "bias")
] + [
    (f"model.layers.{{i}}.mlp.{p}_proj.{kind}", f"layers.{{i}}.mlp.{p}_proj.{kind}")
    for p in ("gate", "up", "down") for kind in ("weight", "bias")
]


class HFFamily(ABC):
    """Declarative import/export for one `model_type`; subclasses set the maps and config translation."""

    model_type: str = ""
    architecture: str = ""
    name_map: list[tuple[str, str]] = []
    ignored_hf_names: tuple[str, ...] = ()  # regexes of non-weight buffers some checkpoints carry

    def __init__(self):
        self._hf_to_ours, self._ours_to_hf = compile_name_map(self.name_map)

    @abstractmethod
    def config_from_hf(self, hf: dict, source: str) -> GPTConfig:
        """Translate config.json (read from `source`) into our config; unsupported settings raise."""

    @abstractmethod
    def config_to_hf(self, cfg: GPTConfig) -> dict:
        """config.json keys for `cfg`; raises when the architecture is not expressible in this family."""

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.fullmatch(pattern, hf_name) for pattern in self.ignored_hf_names)

    def from_hf(self, hf_tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """HF tensors -> (our tensors, our name -> HF source name). Unknown names raise KeyError(name)."""
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
