"""Causal self-attention with grouped-query heads and packed-sequence (block-diagonal) masking.

Shapes: B batch, T tokens, H query heads, G key/value groups, D head dim, N sequences in a pack.

Packed sequences are described by `segment_ids_BT` (one id per token; equal ids = same sequence,
sequences contiguous). Two kernels compute the same thing:
- reference path (any device): `scaled_dot_product_attention` with an explicit boolean mask;
- CUDA path: `torch.nn.attention.varlen.varlen_attn` (flash) over cumulative sequence lengths,
  used when attention runs on CUDA in fp16/bf16 (half-precision weights, or fp32 weights under
  autocast, i.e. bf16-mixed) and the kernel exists; anything else falls back.
The head counts are read from the projected tensors, not the config, so the same code runs on
tensor-parallel shards that hold a subset of the heads.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemo_aligner.models.layers.rope import apply_rope

try:  # CUDA-only flash varlen kernel; absent or unusable on CPU builds.
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None


@dataclass
class AttentionContext:
    """What every layer's attention needs about the batch layout; built once per forward."""

    mask_B1TT: torch.Tensor | None = None  # None means plain causal attention
    cu_seqlens_N1: torch.Tensor | None = None  # int32 boundaries over the flattened batch (varlen path)
    max_seqlen: int = 0
    sliding_window: int | None = None
    compute_dtype: torch.dtype | None = None  # varlen path: q/k/v are cast to this (the kernel has no autocast)


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return _varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def attention_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype attention runs in: the autocast dtype when autocast is on for `device`, else `dtype`.

    Under bf16-mixed the weights and the residual stream stay fp32, so the hidden states' dtype alone
    would never pick the half-precision kernel.
    """
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):  # meta has no autocast state
        return torch.get_autocast_dtype(device.type)
    return dtype


def build_attention_context(
    segment_ids_BT: torch.Tensor | None,
    seq_len: int,
    sliding_window: int | None,
    device: torch.device,
    dtype: torch.dtype,
    use_varlen: bool = True,
) -> AttentionContext:
    window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
    if segment_ids_BT is None:
        if window is None:
            return AttentionContext()
        return AttentionContext(mask_B1TT=_causal_mask(seq_len, window, device)[None, None])
    compute_dtype = attention_dtype(device, dtype)
    if use_varlen and varlen_available(device, compute_dtype):
        cu_seqlens, max_seqlen = cu_seqlens_from_segments(segment_ids_BT)
        return AttentionContext(cu_seqlens_N1=cu_seqlens, max_seqlen=max_seqlen, sliding_window=window,
                                compute_dtype=compute_dtype)
    same_segment_BTT = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
    mask_B1TT = (same_segment_BTT & _causal_mask(seq_len, window, device))[:, None]
    return AttentionContext(mask_B1TT=mask_B1TT)


def _causal_mask(seq_len: int, window: int | None, device) -> torch.Tensor:
    idx = torch.arange(seq_len, device=device)
    allowed_TT = idx[None, :] <= idx[:, None]
    if window is not None:
        allowed_TT &= idx[:, None] - idx[None, :] < window
    return allowed_TT


def cu_seqlens_from_segments(segment_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Boundaries of the contiguous runs of equal ids, over the batch flattened row after row."""
    B, T = segment_ids_BT.shape
    starts_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    starts = torch.nonzero(starts_BT.reshape(-1), as_tuple=False).squeeze(-1)
    cu_seqlens = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


class SelfAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, num_query_groups, head_dim, qkv_bias, out_bias, softmax_scale=None):
        super().__init__()
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_query_groups * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_query_groups * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)

    def forward(self, x_BTE, cos_sin, ctx: AttentionContext):
        B, T, _ = x_BTE.shape
        q_BHTD = self.q_proj(x_BTE).view(B, T, -1, self.head_dim).transpose(1, 2)
        k_BGTD = self.k_proj(x_BTE).view(B, T, -1, self.head_dim).transpose(1, 2)
        v_BGTD = self.v_proj(x_BTE).view(B, T, -1, self.head_dim).transpose(1, 2)
        if cos_sin is not None:
            q_BHTD, k_BGTD = apply_rope(q_BHTD, *cos_sin), apply_rope(k_BGTD, *cos_sin)
        if ctx.cu_seqlens_N1 is not None:
            out_BTHD = self._varlen(q_BHTD, k_BGTD, v_BGTD, ctx)
        else:
            out_BTHD = self._sdpa(q_BHTD, k_BGTD, v_BGTD, ctx).transpose(1, 2)
        return self.o_proj(out_BTHD.reshape(B, T, -1))

    def _sdpa(self, q, k, v, ctx):
        gqa = q.shape[1] != k.shape[1]  # shared key/value heads without materialising repeated copies
        if ctx.mask_B1TT is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask_B1TT, scale=self.softmax_scale,
                                              enable_gqa=gqa)

    def _varlen(self, q_BHTD, k_BGTD, v_BGTD, ctx):
        B, H, T, D = q_BHTD.shape
        # Under autocast q/k leave RoPE in fp32 while v is bf16; the kernel needs one half dtype.
        dtype = ctx.compute_dtype or q_BHTD.dtype
        flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], D).to(dtype)  # noqa: E731
        # Flash's window (left, right): query i sees keys i-left..i+right, so W keys is (W - 1, 0),
        # the same set as the mask path's i - j < W; (-1, 0) is plain causal.
        window = (ctx.sliding_window - 1, 0) if ctx.sliding_window else (-1, 0)
        out = _varlen_attn(
            flat(q_BHTD), flat(k_BGTD), flat(v_BGTD), ctx.cu_seqlens_N1, ctx.cu_seqlens_N1,
            ctx.max_seqlen, ctx.max_seqlen, scale=self.softmax_scale, window_size=window,
            enable_gqa=q_BHTD.shape[1] != k_BGTD.shape[1],
        )
        return out.view(B, T, H, D)
