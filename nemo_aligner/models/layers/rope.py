"""Rotary position embeddings: frequency tables (plain, linear- and llama3-scaled) and their application.

Shapes: B batch, T tokens, H heads, D head dim.
"""

import math

import torch

ROPE_SCALING_TYPES = ("none", "linear", "llama3")


def rope_inv_freq(
    head_dim: int,
    base: float,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies [D/2] in fp32, with the scaling Hugging Face applies for `rope_type`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling == "none":
        return inv_freq
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        return _llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    raise ValueError(f"rope_scaling={scaling!r}; expected one of {ROPE_SCALING_TYPES}")


def _llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor, old_context_len):
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(inv_freq_D2: torch.Tensor, position_ids_BT: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [B, T, D] for the given positions, computed in fp32 then cast."""
    angles_BTD2 = position_ids_BT.to(torch.float32)[..., None] * inv_freq_D2.to(position_ids_BT.device)
    angles_BTD = torch.cat((angles_BTD2, angles_BTD2), dim=-1)
    return angles_BTD.cos().to(dtype), angles_BTD.sin().to(dtype)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Rotate query or key heads (the non-interleaved layout used by Hugging Face Llama-family weights)."""
    cos, sin = cos_BTD[:, None], sin_BTD[:, None]
    return x_BHTD * cos + _rotate_half(x_BHTD) * sin
