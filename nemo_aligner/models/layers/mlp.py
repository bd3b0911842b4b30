"""Normalisation layers and the feed-forward block (gated or plain), named as Megatron configs name them."""

import torch
import torch.nn.functional as F
from torch import nn

# activation name -> (function, gated). Gated activations use gate_proj/up_proj; plain ones fc1 only.
ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
    "geglu_tanh": (lambda x: F.gelu(x, approximate="tanh"), True),  # Gemma's gelu_pytorch_tanh, gated
    "reglu": (F.relu, True),
    "gelu": (F.gelu, False),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), False),
    "relu": (F.relu, False),
    "squared-relu": (lambda x: F.relu(x).square(), False),
    "silu": (F.silu, False),
}
NORMALIZATIONS = ("rmsnorm", "layernorm")


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as Llama-family checkpoints expect.

    zero_centered_gamma (Megatron's layernorm_zero_centered_gamma; Gemma): the scale is 1 + weight (weight
    initialised to 0), applied in fp32 and rounded once at the end, as Gemma checkpoints expect."""

    def __init__(self, size: int, eps: float, zero_centered_gamma: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = zero_centered_gamma
        self.weight = nn.Parameter(torch.zeros(size) if zero_centered_gamma else torch.ones(size))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered_gamma:
            return (x32 * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def make_norm(kind: str, size: int, eps: float, zero_centered_gamma: bool = False) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(size, eps, zero_centered_gamma)
    if kind == "layernorm":
        if zero_centered_gamma:
            raise ValueError("layernorm_zero_centered_gamma is supported with normalization='rmsnorm' only")
        return nn.LayerNorm(size, eps=eps)
    raise ValueError(f"normalization={kind!r}; expected one of {NORMALIZATIONS}")


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int, activation: str, bias: bool):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.act, self.gated = ACTIVATIONS[activation]
        if self.gated:
            self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=bias)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
