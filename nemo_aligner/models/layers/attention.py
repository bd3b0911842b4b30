"""Causal self-attention with grouped-query heads and packed-sequence (block-diagonal) masking.

Shapes: B batch, T tokens, H query heads, G key/value groups, D head dim, N sequences in a pack,
K gathered keys (varlen with branches).

Packed sequences are described by `segment_ids_BT` (one id per token; equal ids = same sequence,
sequences contiguous). Prefix groups (shared-prompt DPO pairs, `data.batch.PrefixGroup`) add
`branch_ids_BT` and explicit `position_ids_BT`: in a segment, branch 0 is the shared prefix and
branch k >= 1 reads the prefix and itself, not the other branches; a sliding window counts positions,
not row offsets (a rejected response's positions restart after the prompt). Three kernels compute the
same thing:
- reference path (any device, the tested one): `scaled_dot_product_attention` with an explicit boolean
  mask (same segment, causal, branch rule, window);
- CUDA path: `torch.nn.attention.varlen.varlen_attn` (flash) over cumulative sequence lengths,
  used when attention runs on CUDA in fp16/bf16 (half-precision weights, or fp32 weights under
  autocast, i.e. bf16-mixed) and the kernel exists; anything else falls back. With branches, each run
  of one (segment, branch) is a query sequence whose keys are its segment's shared prefix followed by
  the run itself, gathered (`kv_index_K`, `cu_seqlens_k_N1`); flash aligns a query sequence shorter than
  its keys to the bottom right, so a branch's query i sees the prefix and its own keys up to i, and
  the window counts key offsets, which are positions there;
- soft-capped scores (Gemma 2's attn_logit_softcapping): neither SDPA nor flash varlen can cap the
  scores, so such a layer materialises them (matmul, cap, mask, fp32 softmax) on every device, packed
  or not, with the same boolean mask as the reference path; that explicit path is its reference.
Each layer's settings live on its module, not in the model config (what a KV cache needs to replay a
layer alone): `sliding_window` (its own window, or None for full attention), `logit_softcapping`,
`softmax_scale`, its q/k norms and `rope_table` (which RoPE table it reads). The model builds one
`AttentionContext` per distinct window (and per varlen / mask choice) once per forward and hands each
layer its own. The head counts are read from the projected tensors, not the config, so the same code
runs on tensor-parallel shards that hold a subset of the heads.

Decoding (`nemo_aligner.generation`) passes a `LayerKVCache`: the new tokens' keys and values are
written into the layer's slots and the queries attend to every filled slot through a [B, 1, T, S] mask
built by `decode_context` (padding, causality and the layer's window, in slot space). Training never
passes a cache and runs exactly the code above. S = cache slots.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nemo_aligner.models.layers.mlp import RMSNorm
from nemo_aligner.models.layers.rope import apply_rope

# none | RMSNorm over each head's dims (Qwen3, Gemma 3) | over the whole q / k projection (OLMo 2)
QK_NORMS = ("none", "head", "full")

try:  # CUDA-only flash varlen kernel; absent or unusable on CPU builds.
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch build
    _varlen_attn = None


@dataclass
class AttentionContext:
    """What a layer's attention needs about the batch layout; built once per forward for each distinct window."""

    mask_B1TT: torch.Tensor | None = None  # None means plain causal attention
    cu_seqlens_N1: torch.Tensor | None = None  # int32 boundaries over the flattened batch (varlen path)
    max_seqlen: int = 0
    sliding_window: int | None = None  # varlen path: the window of the layers this context is for
    compute_dtype: torch.dtype | None = None  # varlen path: q/k/v are cast to this (the kernel has no autocast)
    kv_index_K: torch.Tensor | None = None  # varlen with branches: flat token index of each gathered key
    cu_seqlens_k_N1: torch.Tensor | None = None  # varlen with branches: key boundaries over kv_index_K
    max_seqlen_k: int = 0


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
    branch_ids_BT: torch.Tensor | None = None,
    position_ids_BT: torch.Tensor | None = None,
) -> AttentionContext:
    """How the layers with `sliding_window` attend over this batch layout: plain causal, packed segments,
    or prefix groups (`branch_ids_BT` with `segment_ids_BT` and `position_ids_BT`)."""
    window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
    if branch_ids_BT is not None:
        return _branch_context(segment_ids_BT, branch_ids_BT, position_ids_BT, window, device, dtype, use_varlen)
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


def _branch_context(segment_ids_BT, branch_ids_BT, position_ids_BT, window, device, dtype, use_varlen):
    if segment_ids_BT is None or position_ids_BT is None:
        raise ValueError("branch_ids need segment_ids and position_ids (data.batch.layout_rows gives all three)")
    compute_dtype = attention_dtype(device, dtype)
    if use_varlen and varlen_available(device, compute_dtype):
        return _branch_varlen_context(segment_ids_BT, branch_ids_BT, window, compute_dtype)
    return AttentionContext(mask_B1TT=branch_mask(segment_ids_BT, branch_ids_BT, position_ids_BT, window)[:, None])


def branch_mask(segment_ids_BT, branch_ids_BT, position_ids_BT, window: int | None = None) -> torch.Tensor:
    """[B, T, T] query-key pairs allowed with prefix groups: same segment, causal in the row, the key shared
    (branch 0) or in the query's own branch, and (window) fewer than `window` positions back."""
    T = segment_ids_BT.shape[1]
    idx = torch.arange(T, device=segment_ids_BT.device)
    allowed_BTT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]) & (idx[None, :] <= idx[:, None])[None]
    key_b_B1T = branch_ids_BT[:, None, :]
    allowed_BTT &= (key_b_B1T == 0) | (key_b_B1T == branch_ids_BT[:, :, None])
    if window is not None:
        allowed_BTT &= position_ids_BT[:, :, None] - position_ids_BT[:, None, :] < window
    return allowed_BTT


def _branch_varlen_context(segment_ids_BT, branch_ids_BT, window, compute_dtype) -> AttentionContext:
    """Query sequences = runs of one (segment, branch) over the flattened batch; a branch's keys are its
    segment's shared run (which precedes it in the row) followed by its own tokens, gathered by index."""
    B, T = segment_ids_BT.shape
    device = segment_ids_BT.device
    seg_N, branch_N = segment_ids_BT.reshape(-1), branch_ids_BT.reshape(-1)
    starts_N = torch.ones_like(seg_N, dtype=torch.bool)
    starts_N[1:] = (seg_N[1:] != seg_N[:-1]) | (branch_N[1:] != branch_N[:-1])
    starts_N[::T] = True  # a run never crosses rows
    run_starts = torch.nonzero(starts_N, as_tuple=False).squeeze(-1)
    run_lengths = torch.diff(torch.cat([run_starts, run_starts.new_tensor([B * T])]))
    run_branch = branch_N[run_starts]
    # the shared run a branch reads: the latest branch-0 run at or before it within its segment
    new_segment = torch.ones_like(run_starts, dtype=torch.bool)
    new_segment[1:] = (seg_N[run_starts[1:]] != seg_N[run_starts[:-1]]) | (run_starts[1:] % T == 0)
    is_shared_run = (run_branch == 0) & new_segment
    run_idx = torch.arange(len(run_starts), device=device)
    shared_run = torch.cummax(torch.where(is_shared_run, run_idx, torch.full_like(run_idx, -1)), dim=0).values
    segment_run = torch.cummax(torch.where(new_segment, run_idx, torch.zeros_like(run_idx)), dim=0).values
    has_prefix = (run_branch > 0) & (shared_run >= segment_run) & (shared_run >= 0)
    prefix_len = torch.where(has_prefix, run_lengths[shared_run.clamp(min=0)], torch.zeros_like(run_lengths))
    prefix_start = run_starts[shared_run.clamp(min=0)]
    k_lengths = prefix_len + run_lengths
    max_q, max_k, num_keys = torch.stack([run_lengths.max(), k_lengths.max(), k_lengths.sum()]).tolist()  # one sync
    # gathered keys, run after run: j < prefix_len -> prefix_start + j, else run_start + j - prefix_len
    key_run_K = torch.repeat_interleave(run_idx, k_lengths, output_size=num_keys)
    k_offsets = torch.cumsum(k_lengths, 0) - k_lengths
    j_K = torch.arange(num_keys, device=device) - k_offsets[key_run_K]
    in_prefix_K = j_K < prefix_len[key_run_K]
    kv_index_K = torch.where(in_prefix_K, prefix_start[key_run_K] + j_K,
                             run_starts[key_run_K] + j_K - prefix_len[key_run_K])
    cu_q = torch.cat([run_starts, run_starts.new_tensor([B * T])]).to(torch.int32)
    cu_k = torch.cat([k_lengths.new_zeros(1), torch.cumsum(k_lengths, 0)]).to(torch.int32)
    return AttentionContext(cu_seqlens_N1=cu_q, max_seqlen=max_q, sliding_window=window, compute_dtype=compute_dtype,
                            kv_index_K=kv_index_K, cu_seqlens_k_N1=cu_k, max_seqlen_k=max_k)


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
    """One layer's attention: q/k/v projections (q/k normed per `qk_norm`), RoPE, one of the three kernels, o."""

    def __init__(self, hidden_size, num_heads, num_query_groups, head_dim, qkv_bias, out_bias, softmax_scale=None, *,
                 qk_norm="none", norm_eps=1e-5, zero_centered_gamma=False, sliding_window=None,
                 logit_softcapping=None, rope_table="global"):
        super().__init__()
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm={qk_norm!r}; expected one of {list(QK_NORMS)}")
        self.head_dim = head_dim
        self.softmax_scale = softmax_scale
        self.sliding_window = sliding_window
        self.logit_softcapping = logit_softcapping
        self.rope_table = rope_table
        self.qk_norm = qk_norm
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_query_groups * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_query_groups * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=out_bias)
        if qk_norm != "none":
            q_size, k_size = (head_dim, head_dim) if qk_norm == "head" else (num_heads * head_dim,
                                                                             num_query_groups * head_dim)
            self.q_norm = RMSNorm(q_size, norm_eps, zero_centered_gamma)
            self.k_norm = RMSNorm(k_size, norm_eps, zero_centered_gamma)

    @property
    def uses_varlen(self) -> bool:
        """False where the flash varlen kernel cannot compute this layer (soft-capped scores)."""
        return self.logit_softcapping is None

    def forward(self, x_BTE, cos_sin, ctx: AttentionContext, cache: "LayerKVCache | None" = None):
        B, T, _ = x_BTE.shape
        q_BHTD, k_BGTD, v_BGTD = self._project(x_BTE)
        if cos_sin is not None:
            q_BHTD, k_BGTD = apply_rope(q_BHTD, *cos_sin), apply_rope(k_BGTD, *cos_sin)
        if cache is not None:  # decoding: attend to every filled slot (ctx.mask_B1TT is [B, 1, T, S])
            k_BGTD, v_BGTD = cache.append(k_BGTD, v_BGTD)
        if self.logit_softcapping is not None:
            out_BTHD = self._softcapped(q_BHTD, k_BGTD, v_BGTD, ctx).transpose(1, 2)
        elif ctx.cu_seqlens_N1 is not None:
            out_BTHD = self._varlen(q_BHTD, k_BGTD, v_BGTD, ctx)
        else:
            out_BTHD = self._sdpa(q_BHTD, k_BGTD, v_BGTD, ctx).transpose(1, 2)
        return self.o_proj(out_BTHD.reshape(B, T, -1))

    def _project(self, x_BTE):
        """q [B, H, T, D], k and v [B, G, T, D], with the q/k norms applied before RoPE."""
        B, T, _ = x_BTE.shape
        q, k, v = self.q_proj(x_BTE), self.k_proj(x_BTE), self.v_proj(x_BTE)
        if self.qk_norm == "full":  # OLMo 2: one RMS over every head of the projection
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTHD, k_BTGD, v_BTGD = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head normalised over its own dims
            q_BTHD, k_BTGD = self.q_norm(q_BTHD), self.k_norm(k_BTGD)
        return q_BTHD.transpose(1, 2), k_BTGD.transpose(1, 2), v_BTGD.transpose(1, 2)

    def _softcapped(self, q_BHTD, k_BGTD, v_BGTD, ctx):
        """scores -> cap * tanh(scores / cap) before the mask and the fp32 softmax (Gemma 2)."""
        H, G, T = q_BHTD.shape[1], k_BGTD.shape[1], q_BHTD.shape[2]
        k_BHTD, v_BHTD = k_BGTD.repeat_interleave(H // G, dim=1), v_BGTD.repeat_interleave(H // G, dim=1)
        scale = self.softmax_scale if self.softmax_scale is not None else self.head_dim**-0.5
        scores_BHTT = torch.matmul(q_BHTD, k_BHTD.transpose(-2, -1)) * scale
        scores_BHTT = torch.tanh(scores_BHTT / self.logit_softcapping) * self.logit_softcapping
        allowed = ctx.mask_B1TT if ctx.mask_B1TT is not None else _causal_mask(T, None, q_BHTD.device)
        scores_BHTT = scores_BHTT.masked_fill(~allowed, float("-inf"))
        probs_BHTT = torch.softmax(scores_BHTT, dim=-1, dtype=torch.float32).to(q_BHTD.dtype)
        return torch.matmul(probs_BHTT, v_BHTD)

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
        k_NGD, v_NGD = flat(k_BGTD), flat(v_BGTD)
        cu_k, max_k = ctx.cu_seqlens_N1, ctx.max_seqlen
        if ctx.kv_index_K is not None:  # branches: each query run reads its shared prefix, then itself
            k_NGD, v_NGD = k_NGD[ctx.kv_index_K], v_NGD[ctx.kv_index_K]
            cu_k, max_k = ctx.cu_seqlens_k_N1, ctx.max_seqlen_k
        out = _varlen_attn(
            flat(q_BHTD), k_NGD, v_NGD, ctx.cu_seqlens_N1, cu_k,
            ctx.max_seqlen, max_k, scale=self.softmax_scale, window_size=window,
            enable_gqa=q_BHTD.shape[1] != k_BGTD.shape[1],
        )
        return out.view(B, T, H, D)


# ------------------------------------------------------------------------------------------ KV cache
class KVCache:
    """Keys and values of every layer for B rows of `num_slots` slots, filled left to right.

    All rows share the slot index of each step (prompts are left-padded to one width); `valid_BS` marks the
    slots that hold real tokens, so padding is never attended to. A row's position is the number of valid
    slots before it. Each layer's tensors ([B, G, S, D]) are allocated at its first write, with the heads
    and dtype the layer produces (a tensor-parallel shard holds its own heads only).
    """

    def __init__(self, batch_size: int, num_slots: int, device):
        self.num_slots = num_slots
        self.ids_BS = torch.zeros(batch_size, num_slots, dtype=torch.long, device=device)  # to recompute (LongRoPE)
        self.valid_BS = torch.zeros(batch_size, num_slots, dtype=torch.bool, device=device)
        self.length = 0  # slots filled so far (also by the step in progress once `begin` ran)
        self.layers: dict[str, LayerKVCache] = {}

    @property
    def batch_size(self) -> int:
        return self.valid_BS.shape[0]

    def begin(self, ids_BT: torch.Tensor, valid_BT: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Reserve slots for T new tokens per row (valid_BT: False for padding); returns (first slot, their
        positions [B, T])."""
        start, T = self.length, valid_BT.shape[1]
        if start + T > self.num_slots:
            raise ValueError(f"KV cache of {self.num_slots} slots is full ({start} used, {T} more asked)")
        self.ids_BS[:, start:start + T] = ids_BT
        self.valid_BS[:, start:start + T] = valid_BT
        self.length = start + T
        positions_BT = self.valid_BS[:, :start + T].long().cumsum(dim=1)[:, start:] - 1
        return start, positions_BT.clamp(min=0)

    def restart(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Forget every layer's keys and values; returns (ids, valid) of the filled slots, to recompute them."""
        ids_BL, valid_BL = self.ids_BS[:, :self.length].clone(), self.valid_BS[:, :self.length].clone()
        self.length, self.layers = 0, {}
        return ids_BL, valid_BL

    def layer(self, name: str) -> "LayerKVCache":
        if name not in self.layers:
            self.layers[name] = LayerKVCache(self)
        return self.layers[name]

    def keep_rows(self, index_B: torch.Tensor) -> None:
        """Keep only the rows `index_B` (in that order; repeats allowed): finished rows dropped, or a prompt's
        prefill shared by its samples."""
        self.ids_BS, self.valid_BS = self.ids_BS[index_B], self.valid_BS[index_B]
        for layer in self.layers.values():
            layer.keep_rows(index_B)


class LayerKVCache:
    """One layer's slots in a KVCache."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k_BGSD: torch.Tensor | None = None
        self.v_BGSD: torch.Tensor | None = None

    def append(self, k_BGTD: torch.Tensor, v_BGTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's keys and values (the slots `KVCache.begin` reserved); returns the filled slots."""
        end = self.cache.length
        start = end - k_BGTD.shape[2]
        if self.k_BGSD is None:
            B, G, _, D = k_BGTD.shape
            shape = (B, G, self.cache.num_slots, D)
            self.k_BGSD = k_BGTD.new_zeros(shape)
            self.v_BGSD = v_BGTD.new_zeros(shape[:3] + (v_BGTD.shape[-1],))
        self.k_BGSD[:, :, start:end] = k_BGTD
        self.v_BGSD[:, :, start:end] = v_BGTD
        return self.k_BGSD[:, :, :end], self.v_BGSD[:, :, :end]

    def keep_rows(self, index_B: torch.Tensor) -> None:
        if self.k_BGSD is not None:
            self.k_BGSD, self.v_BGSD = self.k_BGSD[index_B], self.v_BGSD[index_B]


def decode_context(cache: KVCache, start: int, sliding_window: int | None) -> AttentionContext:
    """The mask [B, 1, T, S'] of queries in slots start..cache.length - 1 over keys in slots 0..cache.length - 1:
    a valid key at or before the query, within `sliding_window` slots (left padding is contiguous, so slot
    distance is position distance). A padding query sees itself only: its output is never used, and a row
    with no allowed key would turn into NaN and spread."""
    end = cache.length
    q_T1 = torch.arange(start, end, device=cache.valid_BS.device)[:, None]
    k_1S = torch.arange(end, device=cache.valid_BS.device)[None, :]
    allowed_TS = k_1S <= q_T1
    if sliding_window is not None:
        allowed_TS = allowed_TS & (q_T1 - k_1S < sliding_window)
    valid_BS = cache.valid_BS[:, :end]
    allowed_BTS = allowed_TS[None] & valid_BS[:, None, :]
    is_pad_query_BT1 = ~valid_BS[:, start:end, None]
    allowed_BTS = allowed_BTS | (is_pad_query_BT1 & (k_1S == q_T1)[None])
    return AttentionContext(mask_B1TT=allowed_BTS[:, None])
