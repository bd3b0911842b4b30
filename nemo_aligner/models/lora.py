"""LoRA adapters for a built GPTModel: wrap target linears in place, switch adapters off, merge.

    names = apply_lora(model, cfg.model.peft.lora_tuning)   # base frozen, adapters trainable
    with adapters_disabled(model):                           # the base model (DPO's reference)
        ...

A wrapped projection computes `base(x) + scale * B(A(dropout(x)))` with A: [r, in], B: [out, r] and
scale = alpha / r (alpha null = r, i.e. scale 1, as NeMo; PEFT's default lora_alpha=8 differs, and
the PEFT export writes our actual alpha). NeMo's default init (A xavier, B zero) makes the adapter
output 0 at the start, so a fresh LoRA model computes exactly what the base does. With adapters off
the wrapper returns `base(x)` untouched, bit for bit, whatever A and B hold.

GPTModel itself has no LoRA code. Wrapping renames the base parameters (`q_proj.weight` becomes
`q_proj.base.weight`); `base_weights` / `merged_weights` turn a state dict back into the original
names, which is what Hugging Face export uses. A, B and the base are separate `nn.Linear`s so the
tensor-parallel plan can shard each with the stock DTensor styles (`lora_tp_plan`).
"""

import contextlib
import math

import torch
from torch import nn

# Our projection modules, by their leaf name, and the module that holds them.
PROJECTIONS = {"q_proj": "self_attention", "k_proj": "self_attention", "v_proj": "self_attention",
               "o_proj": "self_attention", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_QKV, _FC1 = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")

# model.peft.lora_tuning.target_modules: NeMo's names, Hugging Face projection names (Llama family, Qwen3,
# Gemma 2/3, OLMo 2 and GPT-2; GPT-2's `c_proj` matches both attn.c_proj and mlp.c_proj, as PEFT's suffix
# match does), and fused ones that stand for several of ours (GPT-2's c_attn, Phi-3's qkv_proj, gate_up_proj).
TARGET_ALIASES = {
    "attention_qkv": _QKV, "attention_dense": ("o_proj",), "mlp_fc1": _FC1, "mlp_fc2": ("down_proj",),
    "attention": (*_QKV, "o_proj"), "mlp": (*_FC1, "down_proj"), "all": tuple(PROJECTIONS),
    **{name: (name,) for name in PROJECTIONS},
    "c_attn": _QKV, "c_proj": ("o_proj", "down_proj"), "attn.c_proj": ("o_proj",), "mlp.c_proj": ("down_proj",),
    "c_fc": ("up_proj",), "qkv_proj": _QKV, "gate_up_proj": _FC1,
}
INIT_METHODS = ("xavier", "normal", "kaiming", "zero")


def resolve_target_modules(names) -> tuple[str, ...]:
    """target_modules (NeMo or Hugging Face names) -> our projection leaf names, in a fixed order."""
    names = [names] if isinstance(names, str) else list(names or [])
    unknown = [n for n in names if n not in TARGET_ALIASES]
    if unknown or not names:
        raise ValueError(f"model.peft.lora_tuning.target_modules={names}: unknown name(s) {unknown}; valid names: "
                         f"{list(TARGET_ALIASES)}")
    wanted = {leaf for n in names for leaf in TARGET_ALIASES[n]}
    return tuple(leaf for leaf in PROJECTIONS if leaf in wanted)


def init_lora_weight(weight: torch.Tensor, method: str) -> None:
    """NeMo's adapter inits: xavier normal, N(0, 0.2), kaiming uniform (a=sqrt 5), zero."""
    with torch.no_grad():
        if method == "xavier":
            nn.init.xavier_normal_(weight)
        elif method == "normal":
            nn.init.normal_(weight, mean=0.0, std=0.2)
        elif method == "kaiming":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif method == "zero":
            nn.init.zeros_(weight)
        else:
            raise ValueError(f"LoRA init method {method!r}; expected one of {list(INIT_METHODS)}")


class LoRALinear(nn.Module):
    """`base` (frozen nn.Linear) plus a rank-r update; `enabled=False` returns base(x) exactly."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank {rank}; expected a positive integer")
        self.base = base
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.scale, self.enabled = rank, float(scale), True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        out = self.base(x)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, [out, in], in fp32 (full tensors only)."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def projection_modules(model: nn.Module, leaves) -> dict[str, nn.Linear]:
    """name -> nn.Linear for every projection of `model` whose leaf name is in `leaves`."""
    out = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if (isinstance(module, nn.Linear) and len(parts) >= 2 and parts[-1] in leaves
                and PROJECTIONS[parts[-1]] == parts[-2]):
            out[name] = module
    return out


def wrap_linear(model: nn.Module, name: str, rank: int, scale: float, dropout: float = 0.0) -> LoRALinear:
    """Replace the nn.Linear at `name` by a LoRALinear around it (A, B left to the caller to fill)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    base = getattr(parent, leaf)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already has a LoRA adapter")
    wrapped = LoRALinear(base, rank, scale, dropout)
    setattr(parent, leaf, wrapped)
    return wrapped


def freeze_base(model: nn.Module) -> None:
    """Only adapter parameters train; everything else (embeddings, norms, base linears) is frozen."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in f".{name}" or ".lora_B." in f".{name}")


def apply_lora(model: nn.Module, cfg) -> list[str]:
    """Wrap every target projection of `model` (a GPTModel, a TokenLogProbModel around one, or a pipeline
    stage) with an adapter built from `cfg` (model.peft.lora_tuning); freeze the rest. Returns wrapped names."""
    leaves = resolve_target_modules(cfg.target_modules)
    rank = cfg.adapter_dim
    alpha = cfg.alpha if cfg.alpha is not None else rank
    targets = projection_modules(model, leaves)
    if not targets:
        raise ValueError(f"model.peft.lora_tuning.target_modules={list(cfg.target_modules)} matches no projection "
                         f"of this model (e.g. gate_proj on a model without a gated MLP)")
    for name in targets:
        wrapped = wrap_linear(model, name, rank, alpha / rank, cfg.adapter_dropout)
        init_lora_weight(wrapped.lora_A.weight, cfg.column_init_method)
        init_lora_weight(wrapped.lora_B.weight, cfg.row_init_method)
    freeze_base(model)
    return list(targets)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for module in lora_modules(model).values():
        module.enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Every adapter of `model` off inside the block (restored on exit, also on error)."""
    modules = list(lora_modules(model).values())
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, was in zip(modules, previous):
            m.enabled = was


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_scales(model: nn.Module) -> dict[str, float]:
    """Wrapped module name -> scale (what a state dict alone does not carry)."""
    return {name: m.scale for name, m in lora_modules(model).items()}


def is_adapter_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def base_name(name: str) -> str:
    """`layers.0.self_attention.q_proj.base.weight` -> `layers.0.self_attention.q_proj.weight`."""
    return name.replace(".base.", ".")


def base_weights(state_dict: dict) -> dict:
    """The base model's tensors under their original names (adapters dropped); a no-op without LoRA."""
    return {base_name(k): v for k, v in state_dict.items() if not is_adapter_key(k)}


def adapter_weights(state_dict: dict) -> dict:
    """Only the adapter tensors (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`)."""
    return {k: v for k, v in state_dict.items() if is_adapter_key(k)}


def merged_weights(state_dict: dict, scales: dict[str, float]) -> dict:
    """Original names with W + scale * B @ A folded in (fp32 arithmetic, cast back); full tensors."""
    out = base_weights(state_dict)
    for module, scale in scales.items():
        a, b = state_dict[f"{module}.lora_A.weight"], state_dict[f"{module}.lora_B.weight"]
        w = out[f"{module}.weight"]
        out[f"{module}.weight"] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return out


def full_state_dict(model: nn.Module) -> dict:
    """model.state_dict() with DTensor shards gathered (collective: every rank of the mesh must call)."""
    out = {}
    for name, tensor in model.state_dict().items():
        out[name] = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return out


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@torch.no_grad()
def merge_adapters_(model: nn.Module) -> None:
    """Fold every adapter into its base weight in place (W += scale * B @ A) and zero B, so the model
    computes what it did, now from base weights alone (for exporting a sharded model as a merged one).
    DTensor weights (tensor parallel, FSDP) get their local slice of the update; collective then (A and B
    are gathered one module at a time), so every rank of the mesh must call it."""
    from torch.distributed.tensor import DTensor

    for module in lora_modules(model).values():
        weight = module.base.weight
        delta = module.scale * (_full(module.lora_B.weight).float() @ _full(module.lora_A.weight).float())
        if isinstance(weight, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
            local = weight.to_local()
            local.add_(delta[tuple(slice(o, o + n) for o, n in zip(offset, shape))].to(local.dtype))
        else:
            weight.add_(delta.to(weight.dtype))
        module.lora_B.weight.zero_()


# ------------------------------------------------------------------------------------------ tensor parallel
def lora_tp_plan(module: nn.Module, plan: dict) -> dict:
    """A tensor-parallel plan rewritten for LoRA-wrapped entries of `module` (a transformer layer).

    Column-parallel base (q/k/v, gate/up): B is sharded like the base (Shard(0) of [out, r]) and A is
    replicated (a plain tensor fed the local copy of the replicated input, which sequence parallel hands
    over as a DTensor); B's input-gradient all-reduce (ColwiseParallel's) also completes A's gradient.
    Row-parallel base (o, down): A is sharded like the base (Shard(1) of [r, in]), its [.., r] partial
    sums are reduced (cheaper than reducing [.., out]) and B, replicated, runs on the result. With sequence parallel the row-parallel output is sequence-sharded, so B
    becomes a Replicate DTensor over sequence-sharded input (SequenceParallel) and its gradient is
    all-reduced like a norm weight's. Entries that are not LoRA-wrapped pass through unchanged.
    """
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
    )

    out = {}
    for name, style in plan.items():
        try:
            target = module.get_submodule(name)
        except AttributeError:
            out[name] = style
            continue
        if not isinstance(target, LoRALinear):
            out[name] = style
            continue
        out[f"{name}.base"] = style
        if isinstance(style, ColwiseParallel):
            if style.input_layouts[0] != Replicate():
                raise ValueError(f"LoRA on {name}: column-parallel base with input layout "
                                  f"{style.input_layouts[0]} (expected Replicate)")
            out[f"{name}.lora_A"] = PrepareModuleInput(input_layouts=(Replicate(),),
                                                       desired_input_layouts=(Replicate(),), use_local_output=True)
            out[f"{name}.lora_B"] = ColwiseParallel(output_layouts=style.output_layouts[0],
                                                    use_local_output=style.use_local_output)
        elif isinstance(style, RowwiseParallel):
            out[f"{name}.lora_A"] = RowwiseParallel(input_layouts=style.input_layouts[0],
                                                    output_layouts=style.output_layouts[0],
                                                    use_local_output=style.use_local_output)
            if style.output_layouts[0] != Replicate():
                out[f"{name}.lora_B"] = SequenceParallel(sequence_dim=style.output_layouts[0].dim,
                                                         use_local_output=True)
        else:
            raise ValueError(f"LoRA on {name}: no tensor-parallel rule for {type(style).__name__}")
    return out


__all__ = ["LoRALinear", "apply_lora", "adapters_disabled", "set_adapters_enabled", "lora_modules", "has_lora",
           "base_weights", "adapter_weights", "merged_weights", "lora_scales", "resolve_target_modules",
           "lora_tp_plan", "TARGET_ALIASES", "INIT_METHODS", "wrap_linear", "freeze_base", "full_state_dict",
           "merge_adapters_", "is_adapter_key"]
