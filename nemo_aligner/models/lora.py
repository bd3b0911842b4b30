"""LoRA adapters for a built GPTModel: wrap target linears in place, switch adapters off, merge.

    names = apply_lora(model, cfg.model.peft.lora_tuning)   # base frozen, adapters trainable
    with adapters_disabled(model):                           # the base model (DPO's reference)
        ...

A wrapped projection computes `base(x) + scale * B(A(dropout(x)))` with A: [r, in], B: [out, r] and
scale = alpha / r (alpha null = r, i.e. scale 1, as NeMo; PEFT's default lora_alpha=8 differs, and
the PEFT export writes our actual alpha). NeMo's default init (A xavier, B zero) makes the adapter
output 0 at the start, so a fresh LoRA model computes exactly what the base does. Each adapter's
random init is drawn from its own generator seeded by (seed, module name), so it does not depend on
the global RNG, on the order modules are wrapped or on which pipeline stage holds the module: a run
from a checkpoint under pp2 starts from the adapters one process would draw. With adapters off
the wrapper returns `base(x)` untouched, bit for bit, whatever A and B hold.

GPTModel itself has no LoRA code. Wrapping renames the base parameters (`q_proj.weight` becomes
`q_proj.base.weight`); `base_weights` / `merged_weights` turn a state dict back into the original
names, which is what Hugging Face export uses. A, B and the base are separate `nn.Linear`s so the
tensor-parallel plan can shard each with the stock DTensor styles
(`parallel.tensor_parallel.lora_tp_plan`). Target names: `models.lora_names`.
"""

import contextlib
import hashlib
import math

import torch
from torch import nn

from nemo_aligner.models.lora_names import INIT_METHODS, PROJECTIONS, TARGET_ALIASES, resolve_target_modules

def init_lora_weight(weight: torch.Tensor, method: str, generator: torch.Generator | None = None) -> None:
    """NeMo's adapter inits: xavier normal, N(0, 0.2), kaiming uniform (a=sqrt 5), zero. With `generator` (a CPU
    one) the values are drawn on the CPU and copied in, so they are the same on every device."""
    if method not in INIT_METHODS:
        raise ValueError(f"LoRA init method {method!r}; expected one of {list(INIT_METHODS)}")
    with torch.no_grad():
        if method == "zero":
            weight.zero_()
            return
        values = torch.empty(weight.shape, dtype=torch.float32) if generator is not None else weight
        if method == "xavier":
            nn.init.xavier_normal_(values, generator=generator)
        elif method == "normal":
            nn.init.normal_(values, mean=0.0, std=0.2, generator=generator)
        else:
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        if values is not weight:
            weight.copy_(values)


def adapter_generator(seed: int, module_name: str, matrix: str) -> torch.Generator:
    """A CPU generator for one adapter matrix ("A" or "B"), seeded by (seed, module name) alone."""
    digest = hashlib.sha256(f"{seed}:{module_name}:{matrix}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


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


def apply_lora(model: nn.Module, cfg, seed: int = 0) -> list[str]:
    """Wrap every target projection of `model` (a GPTModel, a ModelWithHead around one, or a pipeline
    stage) with an adapter built from `cfg` (model.peft.lora_tuning); freeze the rest. Returns wrapped names.
    `seed` (model.seed) and each module's name fix its adapter's init (`adapter_generator`)."""
    leaves = resolve_target_modules(cfg.target_modules)
    rank = cfg.adapter_dim
    alpha = cfg.alpha if cfg.alpha is not None else rank
    targets = projection_modules(model, leaves)
    if not targets:
        raise ValueError(f"model.peft.lora_tuning.target_modules={list(cfg.target_modules)} matches no projection "
                         f"of this model (e.g. gate_proj on a model without a gated MLP)")
    for name in targets:
        wrapped = wrap_linear(model, name, rank, alpha / rank, cfg.adapter_dropout)
        module = name.removeprefix("model.")  # the GPTModel's name, also when wrapped in a ModelWithHead
        init_lora_weight(wrapped.lora_A.weight, cfg.column_init_method, adapter_generator(seed, module, "A"))
        init_lora_weight(wrapped.lora_B.weight, cfg.row_init_method, adapter_generator(seed, module, "B"))
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


__all__ = ["LoRALinear", "apply_lora", "adapters_disabled", "set_adapters_enabled", "lora_modules", "has_lora",
           "base_weights", "adapter_weights", "merged_weights", "lora_scales", "resolve_target_modules",
           "TARGET_ALIASES", "INIT_METHODS", "wrap_linear", "freeze_base", "is_adapter_key"]
