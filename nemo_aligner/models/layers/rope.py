"""Rotary position embeddings: frequency tables (plain, linear-, llama3- and LongRoPE-scaled) and their application.

Shapes: B batch, T tokens, H heads, D head dim, R rotated dims (D, or fewer with partial rotary).

`RotaryTables` holds what one model needs: a "global" table, optionally a "local" one for its
sliding-window layers (Gemma 3 rotates them with another base), and for LongRoPE a second ("long")
set of frequencies. LongRoPE picks the long set for a sequence longer than the original context;
transformers decides that once per forward from the largest position in the whole batch, we decide it
per sequence (per row, or per packed sequence), so a pack computes what its sequences compute alone.
"""

import math

import torch

ROPE_SCALING_TYPES = ("none", "linear", "llama3", "longrope")


def rope_inv_freq(
    head_dim: int,
    base: float,
    scaling: str = "none",
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> torch.Tensor:
    """Inverse frequencies [R/2] in fp32, with the scaling Hugging Face applies for `rope_type`.

    head_dim: the rotated dims R. LongRoPE's per-frequency divisors are applied by `longrope_inv_freq`."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling in ("none", "longrope"):
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


def longrope_inv_freq(head_dim: int, base: float, ext_factors) -> torch.Tensor:
    """LongRoPE (Phi-3 `longrope`, formerly `su`): every frequency divided by its own factor, [R/2] fp32."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32, device="cpu") * base**exponent)


def longrope_attention_factor(factor: float, original_max_position_embeddings: int) -> float:
    """The cos/sin multiplier LongRoPE uses when a config does not give one."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position_embeddings))


def rope_cos_sin(inv_freq_D2: torch.Tensor, position_ids_BT: torch.Tensor, dtype: torch.dtype,
                 attention_scaling: float = 1.0):
    """cos/sin tables [B, T, R] for the given positions, computed in fp32 (scaled, for LongRoPE) then cast."""
    angles_BTD2 = position_ids_BT.to(torch.float32)[..., None] * inv_freq_D2.to(position_ids_BT.device)
    angles_BTD = torch.cat((angles_BTD2, angles_BTD2), dim=-1)
    cos, sin = angles_BTD.cos(), angles_BTD.sin()
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def sequence_lengths(position_ids_BT: torch.Tensor, segment_ids_BT: torch.Tensor | None) -> torch.Tensor:
    """[B, T]: for each token, 1 + the largest position of its sequence (its row, or its run of equal segment ids)."""
    if segment_ids_BT is None:
        return (position_ids_BT.amax(dim=1, keepdim=True) + 1).expand_as(position_ids_BT)
    starts_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    run_BT = starts_BT.long().cumsum(dim=1) - 1  # index of each token's sequence within its row
    longest_BN = torch.zeros_like(position_ids_BT).scatter_reduce(1, run_BT, position_ids_BT, reduce="amax")
    return longest_BN.gather(1, run_BT) + 1


class RotaryTables:
    """The frequency tables of one model (plain tensors, not buffers: nothing to checkpoint)."""

    def __init__(self, inv_freq: torch.Tensor, local_inv_freq: torch.Tensor | None = None,
                 long_inv_freq: torch.Tensor | None = None, original_max_position_embeddings: int = 0,
                 attention_scaling: float = 1.0):
        self.inv_freq = {"global": inv_freq, "local": local_inv_freq if local_inv_freq is not None else inv_freq}
        self.long_inv_freq = long_inv_freq
        self.original_max_position_embeddings = original_max_position_embeddings
        self.attention_scaling = attention_scaling

    def cos_sin(self, position_ids_BT, segment_ids_BT, dtype) -> dict:
        """{"global": (cos, sin), "local": (cos, sin)} [B, T, R] each (one object when both tables agree)."""
        tables = {"global": self._global(position_ids_BT, segment_ids_BT, dtype)}
        local = self.inv_freq["local"]
        tables["local"] = tables["global"] if local is self.inv_freq["global"] else rope_cos_sin(
            local, position_ids_BT, dtype)
        return tables

    def _global(self, position_ids_BT, segment_ids_BT, dtype):
        short = rope_cos_sin(self.inv_freq["global"], position_ids_BT, dtype, self.attention_scaling)
        if self.long_inv_freq is None:
            return short
        long = rope_cos_sin(self.long_inv_freq, position_ids_BT, dtype, self.attention_scaling)
        lengths_BT = sequence_lengths(position_ids_BT, segment_ids_BT)
        use_long_BT1 = (lengths_BT > self.original_max_position_embeddings)[..., None]
        return tuple(torch.where(use_long_BT1, lt, st) for st, lt in zip(short, long))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTD: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate query or key heads (the non-interleaved layout of Hugging Face Llama-family weights); with
    partial rotary (R < D) only the first R dims of each head turn, the rest pass through."""
    cos, sin = cos_BTR[:, None], sin_BTR[:, None]
    rotated = cos.shape[-1]
    if rotated == x_BHTD.shape[-1]:
        return x_BHTD * cos + _rotate_half(x_BHTD) * sin
    x_rot, x_pass = x_BHTD[..., :rotated], x_BHTD[..., rotated:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)
