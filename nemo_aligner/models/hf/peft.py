"""LoRA adapters in Hugging Face PEFT's layout: export, restore, and merged export.

    save_adapters(model, "/results/hf", base_model_name_or_path="/models/Llama-3.2-1B")
    # then, in transformers + peft:  PeftModel.from_pretrained(AutoModelForCausalLM..., "/results/hf")
    load_adapters(model, "/results/hf")          # continue training from a PEFT folder
    save_merged(model, "/results/hf_merged")     # a plain HF model with W + scale * B @ A

Folder: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules as HF module suffixes,
rank_pattern / alpha_pattern where a module differs) + `adapter_model.safetensors` with PEFT's names
(`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...). PEFT's scale is
lora_alpha / r, so lora_alpha is written as our scale x r: PeftModel reproduces our logits exactly.

Fused projections (`FUSED_MODULES`: GPT-2's Conv1D `c_attn`, Phi-3's `qkv_proj` and `gate_up_proj`)
hold several of ours stacked by rows: their adapter is ours combined, A = [Aq; Ak; Av] (rank rq + rk + rv)
and B block-diagonal, so B A x = [Bq Aq x; Bk Ak x; Bv Av x] (missing parts are zero blocks).
`fan_in_fan_out` is true for GPT-2 (Conv1D stores [in, out]; PEFT's A/B keep Linear shapes).
A sidecar `nemo_aligner_lora.json` records our per-module ranks and scales, so restoring our own
export splits a fused adapter back exactly; a foreign one (dense B) is split into adapters on each
part that share copies of A, which computes the same function.

A reward model (`models.score.ScoreModel`) trains its head beside the adapters: the folder is then
task_type SEQ_CLS with `modules_to_save: ["score"]` and the head as `base_model.model.score.weight`
(`peft.AutoPeftModelForSequenceClassification.from_pretrained(folder, num_labels=1)` loads it).
"""

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nemo_aligner.models.hf import FAMILIES, infer_model_type, save_pretrained
from nemo_aligner.models.hf.common import atomic_dir, finish_atomic_dir, rename
from nemo_aligner.models.lora import (
    LoRALinear, adapter_weights, apply_lora, freeze_base, is_adapter_key, lora_modules, lora_scales, merged_weights,
    wrap_linear,
)
from nemo_aligner.models.score import SCORE_WEIGHT, is_score_model, saved_with_adapters, train_score_head

log = logging.getLogger("nemo_aligner")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
SIDECAR = "nemo_aligner_lora.json"
PREFIX = "base_model.model."
# A score model's head trains beside the adapters and is saved whole (PEFT's modules_to_save); PEFT also
# lists "classifier" for SEQ_CLS on its own.
SCORE_MODULES = ("score", "classifier")
SCORE_KEY = f"{PREFIX}score.weight"
_QKV = ("q_proj", "k_proj", "v_proj")
# model_type -> [(HF module regex (group 1: layer), HF module template, our parent module, our parts in row order)]
FUSED_MODULES = {
    "gpt2": [(re.compile(r"(?:transformer\.)?h\.(\d+)\.attn\.c_attn"), "transformer.h.{i}.attn.c_attn",
              "self_attention", _QKV)],
    "phi3": [(re.compile(r"model\.layers\.(\d+)\.self_attn\.qkv_proj"), "model.layers.{i}.self_attn.qkv_proj",
              "self_attention", _QKV),
             (re.compile(r"model\.layers\.(\d+)\.mlp\.gate_up_proj"), "model.layers.{i}.mlp.gate_up_proj",
              "mlp", ("gate_proj", "up_proj"))],
}


def _inner(model):
    """The GPTModel inside a ModelWithHead (names are then relative to it)."""
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def _model_type(model, model_type=None) -> str:
    return model_type or getattr(model, "hf_model_type", None) or infer_model_type(model.config)


def hf_module_name(model_type: str, module: str) -> str:
    """Our `layers.0.self_attention.q_proj` -> HF `model.layers.0.self_attn.q_proj` (fused: GPT-2 q/k/v -> c_attn)."""
    fused = _fused_entry(model_type, module)
    if fused is not None:
        return fused[1].replace("{i}", module.split(".")[1])
    hf = rename(module + ".weight", FAMILIES[model_type]._ours_to_hf)
    if hf is None:
        raise ValueError(f"no Hugging Face name for module {module!r} in model_type {model_type!r}")
    return hf[: -len(".weight")]


def our_module_names(model_type: str, hf_module: str) -> list[str] | None:
    """The inverse of hf_module_name (GPT-2 c_attn -> q, k, v); None when it is not a projection of ours."""
    for pattern, _, parent, leaves in FUSED_MODULES.get(model_type, ()):
        match = pattern.fullmatch(hf_module)
        if match:
            return [f"layers.{match.group(1)}.{parent}.{leaf}" for leaf in leaves]
    if model_type == "gpt2" and not hf_module.startswith("transformer."):
        hf_module = "transformer." + hf_module
    ours = rename(hf_module + ".weight", FAMILIES[model_type]._hf_to_ours)
    if ours is None or ".self_attention." not in ours and ".mlp." not in ours:
        return None
    return [ours[: -len(".weight")]]


def _fused_entry(model_type: str, module: str):
    """The FUSED_MODULES entry holding our projection `module` (`layers.3.mlp.up_proj`), or None."""
    parent, leaf = module.split(".")[-2:]
    return next((entry for entry in FUSED_MODULES.get(model_type, ()) if entry[2] == parent and leaf in entry[3]),
                None)


def _target_key(hf_module: str) -> str:
    """PEFT target suffix: the part after the layer index (`self_attn.q_proj`, `attn.c_attn`, `mlp.c_proj`)."""
    match = re.match(r"^.*?\.\d+\.(.+)$", hf_module)
    return match.group(1) if match else hf_module


# ------------------------------------------------------------------------------------------------ export
def adapter_specs(model) -> dict[str, dict]:
    """Wrapped module name -> {rank, scale, dropout}: what the adapter tensors alone do not say."""
    return {name: {"rank": m.rank, "scale": m.scale, "dropout": float(getattr(m.dropout, "p", 0.0))}
            for name, m in lora_modules(_inner(model)).items()}


def _row_sizes(config, leaves) -> list[int]:
    """Output rows of each of our projections `leaves` (the blocks of a fused HF weight)."""
    q, kv, ffn = (config.num_attention_heads * config.kv_channels, config.num_query_groups * config.kv_channels,
                  config.ffn_hidden_size)
    return [{"q_proj": q, "k_proj": kv, "v_proj": kv, "gate_proj": ffn, "up_proj": ffn}[leaf] for leaf in leaves]


def peft_tensors(tensors: dict, specs: dict, config, model_type: str):
    """(PEFT tensors, {hf module: (rank, scale)}) from our full adapter tensors and their specs."""
    groups: dict[str, list[str]] = {}
    for module in specs:
        groups.setdefault(hf_module_name(model_type, module), []).append(module)
    out, shapes = {}, {}
    for hf_module, parts in groups.items():  # one part, except fused modules (c_attn: q, k and/or v)
        fused = _fused_entry(model_type, parts[0])
        if fused is None:
            a, b = tensors[f"{parts[0]}.lora_A.weight"], tensors[f"{parts[0]}.lora_B.weight"]
            scale = specs[parts[0]]["scale"]
        else:
            leaves = fused[3]
            a, b, scale = _fuse(parts, leaves, tensors, specs, _row_sizes(config, leaves))
        out[f"{PREFIX}{hf_module}.lora_A.weight"] = a.detach().cpu().contiguous()
        out[f"{PREFIX}{hf_module}.lora_B.weight"] = b.detach().cpu().contiguous()
        shapes[hf_module] = (a.shape[0], scale)
    return out, shapes


def _fuse(parts, leaves, tensors, specs, sizes):
    """One fused adapter from ours (e.g. c_attn from q/k/v): A stacked, B block-diagonal (each block rescaled to
    the first part's scale)."""
    layer_prefix = parts[0].rsplit(".", 1)[0]
    present = [p for p in leaves if f"{layer_prefix}.{p}" in parts]
    scale = specs[f"{layer_prefix}.{present[0]}"]["scale"]
    a_parts = [tensors[f"{layer_prefix}.{p}.lora_A.weight"] for p in present]
    ranks = [t.shape[0] for t in a_parts]
    b = a_parts[0].new_zeros(sum(sizes), sum(ranks))
    col = 0
    for p, rank in zip(present, ranks):
        row = sum(sizes[: leaves.index(p)])
        ratio = specs[f"{layer_prefix}.{p}"]["scale"] / scale
        b_part = tensors[f"{layer_prefix}.{p}.lora_B.weight"]
        b[row:row + b_part.shape[0], col:col + rank] = b_part if ratio == 1.0 else b_part * ratio
        col += rank
    return torch.cat(a_parts, dim=0), b, scale


def _patterns(shapes: dict) -> tuple[int, float, dict, dict]:
    """Default r / lora_alpha (the most common) and per-module rank_pattern / alpha_pattern."""
    ranks = {m: r for m, (r, _) in shapes.items()}
    alphas = {m: _number(s * r) for m, (r, s) in shapes.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    return r, alpha, _pattern(ranks, r), _pattern(alphas, alpha)


def _pattern(values: dict, default) -> dict:
    by_key: dict[str, set] = {}
    for module, value in values.items():
        by_key.setdefault(_target_key(module), set()).add(value)
    out = {}
    for module, value in values.items():
        if value == default:
            continue
        key = _target_key(module)
        out[key if len(by_key[key]) == 1 else re.escape(module)] = value
    return out


def _number(x: float):
    return int(round(x)) if abs(x - round(x)) < 1e-9 else x


def write_adapter_folder(path, tensors: dict, specs: dict, config, model_type: str, tokenizer=None,
                         base_model_name_or_path: str | None = None) -> Path:
    """The PEFT folder (atomically) from full adapter tensors in our names, their specs and the GPTConfig.
    A reward model's `tensors` also hold its head (`models.score.saved_with_adapters`): the folder is then
    SEQ_CLS with the head saved whole; a causal LM's must hold adapters only."""
    if not specs:
        raise ValueError("no LoRA adapters to save (model.peft.peft_scheme=none?)")
    path = Path(path)
    peft_weights, shapes = peft_tensors(adapter_weights(tensors), specs, config, model_type)
    score = SCORE_WEIGHT in tensors  # a score model: SEQ_CLS, its head saved whole
    if score:
        peft_weights[SCORE_KEY] = tensors[SCORE_WEIGHT].detach().cpu().contiguous()
    r, alpha, rank_pattern, alpha_pattern = _patterns(shapes)
    adapter_config = {
        "peft_type": "LORA", "task_type": "SEQ_CLS" if score else "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(spec["dropout"] for spec in specs.values()),
        "target_modules": sorted({_target_key(m) for m in shapes}), "bias": "none",
        "fan_in_fan_out": model_type == "gpt2", "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "use_rslora": False, "use_dora": False, "modules_to_save": ["score"] if score else None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
    }
    sidecar = {"format": 1, "model_type": model_type, "modules": specs}
    tmp = atomic_dir(path)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2) + "\n")
    (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    save_file(peft_weights, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save(tmp)
    finish_atomic_dir(tmp, path)
    return path


def save_adapters(model, path, tokenizer=None, base_model_name_or_path: str | None = None,
                  model_type: str | None = None, state_dict: dict | None = None) -> Path:
    """Write a PEFT adapter folder (atomically) that `peft.PeftModel.from_pretrained(base, path)` loads.
    state_dict: full tensors in our names when the caller gathered them; default the model's own."""
    inner = _inner(model)
    tensors = state_dict if state_dict is not None else inner.state_dict()
    saved = saved_with_adapters(inner)  # a reward model's head; a causal LM's output layer is base, not saved
    tensors = {name: t for name, t in tensors.items() if is_adapter_key(name) or name in saved}
    return write_adapter_folder(path, tensors, adapter_specs(inner), inner.config, _model_type(inner, model_type),
                                tokenizer, base_model_name_or_path)


def save_merged(model, path, tokenizer=None, model_type: str | None = None, state_dict: dict | None = None,
                dtype=None) -> Path:
    """A plain Hugging Face folder with every adapter folded into its base weight (W + scale * B @ A)."""
    inner = _inner(model)
    full = state_dict if state_dict is not None else inner.state_dict()
    return save_pretrained(inner, path, tokenizer=tokenizer, model_type=_model_type(inner, model_type),
                           dtype=dtype, state_dict=merged_weights(full, lora_scales(inner)))


# ---------------------------------------------------------------------------------------------- restore
def read_adapter_config(path: Path) -> dict:
    file = path / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; model.peft.restore_from_path must be a PEFT adapter folder "
                                f"({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    cfg = json.loads(file.read_text())
    unsupported = {"peft_type": cfg.get("peft_type") != "LORA", "use_dora": bool(cfg.get("use_dora")),
                   "bias": cfg.get("bias", "none") != "none",
                   "modules_to_save": bool(set(cfg.get("modules_to_save") or ()) - set(SCORE_MODULES)),
                   "layers_to_transform": cfg.get("layers_to_transform") is not None}
    bad = [k for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"{file}: unsupported adapter settings {({k: cfg.get(k) for k in bad})}; supported: plain "
                         "LoRA (peft_type LORA, bias none, no DoRA, no modules_to_save but a reward model's score, every layer)")
    return cfg


def _lookup(pattern: dict, module: str, default):
    # PEFT's rule: a pattern key matches a module name ending in it (after a dot or at the start).
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_adapters(model, path, dropout: float = 0.0) -> list[str]:
    """Add the adapters of a PEFT folder to `model` (wrapping its projections) and freeze the base.
    The folder decides ranks, scales and targets. Returns the wrapped module names."""
    path = Path(path)
    inner = _inner(model)
    cfg = read_adapter_config(path)
    weights_file = path / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: missing (pickled adapter_model.bin files are never loaded)")
    model_type = _model_type(inner)
    sidecar = json.loads((path / SIDECAR).read_text()) if (path / SIDECAR).is_file() else None
    saved = load_file(weights_file)
    _restore_score(inner, saved.pop(SCORE_KEY, None), weights_file)
    pairs = _adapter_pairs(saved, weights_file)
    wrapped = []
    for hf_module, (a, b) in pairs.items():
        ours = our_module_names(model_type, hf_module)
        if ours is None:
            raise ValueError(f"{weights_file}: adapter on {hf_module!r}, which is not an attention or MLP "
                             f"projection of this {model_type} model")
        if not _in_this_stage(inner, ours[0]):
            continue
        rank = a.shape[0]
        alpha = _lookup(cfg.get("alpha_pattern"), hf_module, cfg.get("lora_alpha", 8))
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        for name, a_part, b_part, part_scale in _split(inner, ours, a, b, scale, sidecar):
            _install(inner, name, a_part, b_part, part_scale, dropout, weights_file, hf_module)
            wrapped.append(name)
    freeze_base(inner)
    return wrapped


def _restore_score(inner, score, source: Path) -> None:
    """A reward model's head saved beside its adapters goes back into the score model (its last stage)."""
    if score is None:
        return
    if not is_score_model(inner):
        raise ValueError(f"{source}: holds a sequence-classification head ({SCORE_KEY}); restore it into a reward "
                         "model (train_reward_model.py), not a causal LM")
    if inner.output_layer is None:  # a pipeline stage without the head
        return
    if tuple(score.shape) != tuple(inner.output_layer.weight.shape):
        raise ValueError(f"{source}: {SCORE_KEY} has shape {list(score.shape)}; the model's head is "
                         f"{list(inner.output_layer.weight.shape)}")
    with torch.no_grad():
        inner.output_layer.weight.copy_(score)


def _in_this_stage(inner, name: str) -> bool:
    """False for a layer that a pipeline stage dropped (its adapters are another stage's)."""
    match = re.match(r"layers\.(\d+)\.", name)
    return not (match and match.group(1) not in inner.layers and int(match.group(1)) < inner.config.num_layers)


def _adapter_pairs(tensors: dict, source: Path) -> dict:
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise ValueError(f"{source}: unexpected tensor {key!r}; expected only <module>.lora_A/lora_B.weight")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{source}: module {module!r} has lora_{next(iter(pair))} without its partner")
    return {module: (pair["A"], pair["B"]) for module, pair in pairs.items()}


def _split(inner, ours, a, b, scale, sidecar):
    """[(our module, A, B, scale)] for one HF adapter; only fused modules (FUSED_MODULES) have several parts."""
    if len(ours) == 1:
        return [(ours[0], a, b, scale)]
    sizes = [inner.get_submodule(name).out_features for name in ours]
    if b.shape[0] != sum(sizes):
        leaves = ", ".join(name.rsplit(".", 1)[1] for name in ours)
        raise ValueError(f"fused adapter B has {b.shape[0]} rows; the model's {leaves} have {sum(sizes)}")
    rows = [sum(sizes[:i]) for i in range(len(ours))]
    known = (sidecar or {}).get("modules", {})
    present = [i for i, name in enumerate(ours) if name in known]
    if present and sum(known[ours[i]]["rank"] for i in present) == a.shape[0]:  # our own export: exact blocks
        out, col = [], 0
        for i in present:
            rank, part_scale = known[ours[i]]["rank"], known[ours[i]]["scale"]
            b_part = b[rows[i]:rows[i] + sizes[i], col:col + rank]
            out.append((ours[i], a[col:col + rank], b_part * (scale / part_scale) if part_scale != scale else b_part,
                        part_scale))
            col += rank
        return out
    return [(name, a.clone(), b[row:row + size], scale) for name, row, size in zip(ours, rows, sizes)]


def _install(inner, name, a, b, scale, dropout, source, hf_module):
    target = inner.get_submodule(name)
    base = target.base if isinstance(target, LoRALinear) else target
    if tuple(a.shape[1:]) != (base.in_features,) or b.shape[0] != base.out_features or b.shape[1] != a.shape[0]:
        raise ValueError(f"{source}: adapter {hf_module!r} has A {list(a.shape)}, B {list(b.shape)}; the model's "
                         f"{name} maps {base.in_features} -> {base.out_features}")
    if isinstance(target, LoRALinear):
        if target.rank != a.shape[0]:
            raise ValueError(f"{name} already has a rank-{target.rank} adapter; {source} holds rank {a.shape[0]}")
        target.scale = float(scale)
    else:
        target = wrap_linear(inner, name, a.shape[0], scale, dropout)
    with torch.no_grad():
        target.lora_A.weight.copy_(a)
        target.lora_B.weight.copy_(b)


# ------------------------------------------------------------------------------------------------ recipes
def setup_peft(model, peft_cfg, seed: int = 0) -> list[str]:
    """model.peft: nothing (none), adapters restored from a PEFT folder, or fresh adapters (lora) whose init
    `seed` (model.seed) and the module names fix."""
    if peft_cfg.peft_scheme == "none":
        return []
    lora = peft_cfg.lora_tuning
    if peft_cfg.restore_from_path:
        names = load_adapters(model, peft_cfg.restore_from_path, dropout=lora.adapter_dropout)
        how = f"restored from {peft_cfg.restore_from_path} (its ranks and targets; model.peft.lora_tuning ignored)"
    else:
        names = apply_lora(model, lora, seed=seed)
        alpha = lora.alpha if lora.alpha is not None else lora.adapter_dim
        how = f"targets {list(lora.target_modules)}, rank {lora.adapter_dim}, alpha {alpha:g}"
    train_score_head(model)  # a reward model's head trains with the adapters (PEFT's modules_to_save)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA: %d adapters (%s); %s trainable parameters of %s (%.3f%%), base frozen", len(names), how,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return names


__all__ = ["save_adapters", "load_adapters", "save_merged", "peft_tensors", "setup_peft",
           "hf_module_name", "our_module_names", "read_adapter_config", "write_adapter_folder", "adapter_specs"]
