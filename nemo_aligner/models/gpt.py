"""GPTConfig and GPTModel: one plain-PyTorch decoder for the Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3,
OLMo 2 and GPT-2 families.

The model knows nothing of parallelism or losses. It returns hidden states; the output projection is
a separate step (`output_weight`, `logits`) so log-probs can be computed a chunk at a time.
Layers live in a ModuleDict keyed by their global index so pipeline stages can drop modules and keep
checkpoint names. A stage without `embedding` takes hidden states as input; one without `final_norm`
returns un-normalised hidden states.
`decode` is the KV-cache path beside `forward` (generation: prefill, then a token at a time); `forward`
never touches a cache, so training numerics do not depend on it.

Shapes: B batch, T tokens, E hidden size, V vocabulary.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nemo_aligner.models.layers.attention import (
    QK_NORMS, AttentionContext, KVCache, SelfAttention, build_attention_context, decode_context,
)
from nemo_aligner.models.layers.mlp import ACTIVATIONS, MLP, NORMALIZATIONS, RMSNorm, make_norm
from nemo_aligner.models.layers.rope import (
    ROPE_SCALING_TYPES, RotaryTables, longrope_attention_factor, longrope_inv_freq, rope_inv_freq,
)

POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute")
NORM_PLACEMENTS = ("pre", "sandwich", "post")
LAYER_TYPES = ("sliding", "full")


@dataclass
class GPTConfig:
    """Architecture, with Megatron/NeMo key names (`model.*` in the training configs)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # key/value heads (GQA); None = num_attention_heads
    kv_channels: int | None = None  # head dim; None = hidden_size // num_attention_heads
    normalization: str = "rmsnorm"  # rmsnorm | layernorm
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | geglu | geglu_tanh | reglu | gelu | gelu_tanh | relu | squared-relu | silu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_base: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 | longrope
    rope_scaling_factor: float = 1.0  # linear, llama3, longrope (context extension ratio)
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3, longrope: the pre-training context length
    max_position_embeddings: int = 2048
    add_qkv_bias: bool = False
    add_bias_linear: bool = False  # attention output and MLP biases
    share_embeddings_and_output_weights: bool = False
    vocab_size: int = 256
    sliding_window: int | None = None  # local attention window (tokens) of the "sliding" layers; None = full
    init_method_std: float = 0.02
    activations_checkpointing: bool = False  # recompute each transformer layer in backward
    layer_types: tuple[str, ...] | None = None  # per layer "sliding" | "full"; None = all slide iff sliding_window
    qk_norm: str = "none"  # none | head (RMSNorm per q/k head before RoPE: Qwen3, Gemma 3) | full (whole projection)
    norm_placement: str = "pre"  # pre (Llama) | sandwich (also after attention and MLP: Gemma 2/3) | post (OLMo 2)
    layernorm_zero_centered_gamma: bool = False  # RMSNorm scales by (1 + weight), weight initialised to 0 (Gemma)
    embedding_multiplier: float = 1.0  # token embeddings times this (Gemma: hidden_size ** 0.5)
    softmax_scale: float | None = None  # score scale; None = kv_channels ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap) before the softmax (Gemma 2)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap), chunked log-probs too (Gemma 2)
    rotary_base_local: float | None = None  # RoPE base of the "sliding" layers, unscaled (Gemma 3); None = rotary_base
    rotary_percent: float = 1.0  # fraction of each head's dims that RoPE rotates (Phi-3 partial_rotary_factor)
    rope_short_factor: tuple[float, ...] | None = None  # longrope: per-frequency divisors within the original context
    rope_long_factor: tuple[float, ...] | None = None  # longrope: divisors for sequences longer than it
    rope_attention_factor: float | None = None  # longrope: cos/sin multiplier; None = sqrt(1 + ln factor / ln original)

    def __post_init__(self):
        self.num_query_groups = self.num_query_groups or self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "kv_channels"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)}; expected a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                             f"model.num_query_groups={self.num_query_groups}")
        _check_choice("normalization", self.normalization, NORMALIZATIONS)
        _check_choice("activation", self.activation, tuple(sorted(ACTIVATIONS)))
        _check_choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _check_choice("rope_scaling", self.rope_scaling, ROPE_SCALING_TYPES)
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        self._check_architecture_options()

    def _check_architecture_options(self):
        for key in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "softmax_scale",
                    "rotary_base_local", "rope_attention_factor"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"model.{key}={getattr(self, key)}; expected a positive number or null")
        if self.embedding_multiplier <= 0:
            raise ValueError(f"model.embedding_multiplier={self.embedding_multiplier}; expected a positive number")
        if self.layernorm_zero_centered_gamma and self.normalization != "rmsnorm":
            raise ValueError(f"model.layernorm_zero_centered_gamma=true needs model.normalization='rmsnorm', "
                             f"got {self.normalization!r}")
        if not 0 < self.rotary_percent <= 1 or self.rotary_dim % 2:
            raise ValueError(f"model.rotary_percent={self.rotary_percent}; expected 0 < p <= 1 with "
                             f"kv_channels * p an even number of dims (kv_channels={self.kv_channels})")
        self._check_layer_types()
        self._check_longrope()

    def _check_layer_types(self):
        if self.layer_types is None:
            return
        self.layer_types = tuple(self.layer_types)  # a list from YAML / JSON
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(f"model.layer_types={list(self.layer_types)}; expected model.num_layers="
                             f"{self.num_layers} entries, each one of {list(LAYER_TYPES)}")
        if "sliding" in self.layer_types and self.sliding_window is None:
            raise ValueError("model.layer_types has 'sliding' layers but model.sliding_window is null")

    def _check_longrope(self):
        for key in ("rope_short_factor", "rope_long_factor"):
            if getattr(self, key) is not None:
                setattr(self, key, tuple(float(f) for f in getattr(self, key)))
            if self.rope_scaling == "longrope" and len(getattr(self, key) or ()) != self.rotary_dim // 2:
                raise ValueError(f"model.rope_scaling='longrope' needs model.{key} with {self.rotary_dim // 2} "
                                 f"numbers (one per rotary frequency); got {getattr(self, key)}")

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.kv_channels * self.rotary_percent)

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` attends within `sliding_window` (its type, or every layer when types are unset)."""
        if self.layer_types is None:
            return self.sliding_window is not None
        return self.layer_types[layer] == "sliding"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"model.{key}={value!r}; expected one of {list(choices)}")


def attention_for_layer(cfg: GPTConfig, layer: int) -> SelfAttention:
    """Layer `layer`'s attention, its window / soft-cap / scale / RoPE table fixed at construction."""
    sliding = cfg.is_sliding(layer)
    return SelfAttention(
        cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels,
        qkv_bias=cfg.add_qkv_bias, out_bias=cfg.add_bias_linear, softmax_scale=cfg.softmax_scale,
        qk_norm=cfg.qk_norm, norm_eps=cfg.layernorm_epsilon, zero_centered_gamma=cfg.layernorm_zero_centered_gamma,
        sliding_window=cfg.sliding_window if sliding else None, logit_softcapping=cfg.attn_logit_softcapping,
        rope_table="local" if sliding and cfg.rotary_base_local is not None else "global",
    )


class TransformerLayer(nn.Module):
    """One residual block. model.norm_placement: pre (Llama: x + f(norm(x))), sandwich (Gemma 2/3:
    x + norm(f(norm(x)))) or post (OLMo 2: x + norm(f(x))). A norm the placement lacks is None.

    Names: `post_attention_norm` is the norm before the MLP (Llama's post_attention_layernorm);
    `attention_output_norm` / `mlp_output_norm` normalise a sublayer's output before the residual add.
    """

    def __init__(self, cfg: GPTConfig, layer: int = 0):
        super().__init__()
        pre, post = cfg.norm_placement in ("pre", "sandwich"), cfg.norm_placement in ("sandwich", "post")

        def norm():
            return make_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon,
                             cfg.layernorm_zero_centered_gamma)

        self.input_norm = norm() if pre else None
        self.self_attention = attention_for_layer(cfg, layer)
        self.attention_output_norm = norm() if post else None
        self.post_attention_norm = norm() if pre else None
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.add_bias_linear)
        self.mlp_output_norm = norm() if post else None

    def forward(self, x_BTE, cos_sin, ctx: AttentionContext, cache=None):
        # no cache argument at all in training: the call tensor-parallel and compiled wrappers see is unchanged
        extra = {} if cache is None else {"cache": cache}
        attended_BTE = self.self_attention(_maybe_norm(self.input_norm, x_BTE), cos_sin, ctx, **extra)
        x_BTE = x_BTE + _maybe_norm(self.attention_output_norm, attended_BTE)
        return x_BTE + _maybe_norm(self.mlp_output_norm, self.mlp(_maybe_norm(self.post_attention_norm, x_BTE)))


def _maybe_norm(norm, x):
    return x if norm is None else norm(x)


def rotary_tables(cfg: GPTConfig) -> RotaryTables:
    """The RoPE frequency tables `cfg` implies (global, the sliding layers' own base, LongRoPE's long set)."""
    dim = cfg.rotary_dim
    scaling = (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
               cfg.rope_original_max_position_embeddings)
    local = rope_inv_freq(dim, cfg.rotary_base_local) if cfg.rotary_base_local is not None else None
    if cfg.rope_scaling != "longrope":
        return RotaryTables(rope_inv_freq(dim, cfg.rotary_base, *scaling), local)
    original = cfg.rope_original_max_position_embeddings
    attention_factor = cfg.rope_attention_factor
    if attention_factor is None:
        attention_factor = longrope_attention_factor(cfg.rope_scaling_factor, original)
    return RotaryTables(longrope_inv_freq(dim, cfg.rotary_base, cfg.rope_short_factor), local,
                        longrope_inv_freq(dim, cfg.rotary_base, cfg.rope_long_factor), original, attention_factor)


def positions_from_segments(segment_ids_BT: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every sequence start of a pack."""
    B, T = segment_ids_BT.shape
    idx_BT = torch.arange(T, device=segment_ids_BT.device).expand(B, T)
    is_start_BT = torch.ones_like(segment_ids_BT, dtype=torch.bool)
    is_start_BT[:, 1:] = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
    start_idx_BT = torch.cummax(torch.where(is_start_BT, idx_BT, torch.zeros_like(idx_BT)), dim=1).values
    return idx_BT - start_idx_BT


class GPTModel(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config, i) for i in range(config.num_layers)})
        self.final_norm = make_norm(config.normalization, config.hidden_size, config.layernorm_epsilon,
                                    config.layernorm_zero_centered_gamma)
        self.output_layer = None
        if not config.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = rotary_tables(config) if config.position_embedding_type == "rope" else None
        self.use_varlen = True  # tests switch this off to compare the CUDA kernel with the mask path
        self.init_weights()

    def init_weights(self):
        std = self.config.init_method_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.LayerNorm, RMSNorm)):
                (nn.init.zeros_ if getattr(module, "zero_centered_gamma", False) else nn.init.ones_)(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, E] weight of the output projection (the embedding when they are shared)."""
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, inputs, position_ids=None, segment_ids=None, branch_ids=None):
        """inputs: token ids [B, T] (first stage) or hidden states [B, T, E]; returns hidden states [B, T, E].

        position_ids [B, T]: default 0..T-1, or restarting per sequence when segment_ids is given.
        segment_ids [B, T]: packed-sequence ids; attention is then block-diagonal causal.
        branch_ids [B, T]: prefix groups (data.batch): 0 = shared by the segment's branches, k = branch k,
        which reads the shared tokens and itself only; needs segment_ids and position_ids.
        """
        B, T = inputs.shape[:2]
        if branch_ids is not None and (position_ids is None or segment_ids is None):
            raise ValueError("branch_ids need position_ids and segment_ids (data.batch.layout_rows gives all three)")
        if position_ids is None:
            position_ids = (positions_from_segments(segment_ids) if segment_ids is not None
                            else torch.arange(T, device=inputs.device).expand(B, T))
        x_BTE = self._embed(inputs, position_ids)
        cos_sin = None
        if self.rotary is not None:
            cos_sin = self.rotary.cos_sin(position_ids, segment_ids, x_BTE.dtype)
        contexts = self._attention_contexts(segment_ids, T, x_BTE.device, x_BTE.dtype, branch_ids, position_ids)
        for layer in self.layers.values():
            attention = layer.self_attention
            args = (x_BTE, cos_sin[attention.rope_table] if cos_sin is not None else None,
                    contexts[attention.sliding_window, attention.uses_varlen])
            if self.config.activations_checkpointing and torch.is_grad_enabled():
                x_BTE = checkpoint(layer, *args, use_reentrant=False)
            else:
                x_BTE = layer(*args)
        return self.final_norm(x_BTE) if self.final_norm is not None else x_BTE

    def _attention_contexts(self, segment_ids, seq_len, device, dtype, branch_ids=None, position_ids=None) -> dict:
        """(window, varlen allowed) -> AttentionContext for the layers of this model (or stage), built once."""
        contexts = {}
        for layer in self.layers.values():
            attention = layer.self_attention
            key = (attention.sliding_window, attention.uses_varlen)
            if key not in contexts:
                contexts[key] = build_attention_context(segment_ids, seq_len, attention.sliding_window, device,
                                                        dtype, use_varlen=self.use_varlen and attention.uses_varlen,
                                                        branch_ids_BT=branch_ids, position_ids_BT=position_ids)
        return contexts

    def _embed(self, inputs, position_ids):
        if self.embedding is None:
            return inputs
        x_BTE = self.embedding(inputs)
        if self.config.embedding_multiplier != 1.0:
            # rounded to the embeddings' dtype first, as transformers' Gemma (sqrt(3072) is 55.5 in bf16)
            x_BTE = x_BTE * torch.tensor(self.config.embedding_multiplier, dtype=torch.float32).to(x_BTE.dtype)
        if self.position_embedding is not None:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} >= model.max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            x_BTE = x_BTE + self.position_embedding(position_ids)
        return x_BTE

    def decode(self, input_ids_BT: torch.Tensor, valid_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Hidden states [B, T, E] of T new tokens per row, appended to `cache` and attending to everything in it
        (prefill: the left-padded prompts, valid_BT False on padding; then one token per step).

        Positions count the valid slots of each row. LongRoPE picks its factors per row from the length so far
        (the largest new position + 1); the step a row outgrows the original context, the whole cache is
        recomputed (as transformers' Phi-3 does), so every logit equals a full forward over the sequence so far.
        Layers are called through their eager `forward`: a compiled block would recompile for every cache
        length (hooks on the layer itself, FSDP's, are skipped; tensor-parallel hooks live on its projections)."""
        T = input_ids_BT.shape[1]
        start, position_ids_BT = cache.begin(input_ids_BT, valid_BT)
        if start > 0 and self._outgrows_short_rope(position_ids_BT):
            input_ids_BT, valid_BT = cache.restart()
            start, position_ids_BT = cache.begin(input_ids_BT, valid_BT)
        x_BTE = self._embed(input_ids_BT, position_ids_BT)
        cos_sin = self.rotary.cos_sin(position_ids_BT, None, x_BTE.dtype) if self.rotary is not None else None
        contexts = {}
        for name, layer in self.layers.items():
            attention = layer.self_attention
            if attention.sliding_window not in contexts:
                contexts[attention.sliding_window] = decode_context(cache, start, attention.sliding_window)
            x_BTE = layer.forward(x_BTE, cos_sin[attention.rope_table] if cos_sin is not None else None,
                                  contexts[attention.sliding_window], cache=cache.layer(name))
        x_BTE = x_BTE[:, -T:]
        return self.final_norm(x_BTE) if self.final_norm is not None else x_BTE

    def _outgrows_short_rope(self, position_ids_BT) -> bool:
        """A row reaches length original + 1 in this step (LongRoPE's switch to its long factors)."""
        rotary = self.rotary
        if rotary is None or rotary.long_inv_freq is None:
            return False
        return bool((position_ids_BT == rotary.original_max_position_embeddings).any())

    def logits(self, input_ids, position_ids=None, segment_ids=None, branch_ids=None) -> torch.Tensor:
        """Full logits [B, T, V]; for users and tests (training computes log-probs in chunks instead)."""
        hidden_BTE = self(input_ids, position_ids=position_ids, segment_ids=segment_ids, branch_ids=branch_ids)
        logits_BTV = F.linear(hidden_BTE, self.output_weight)
        cap = self.config.final_logit_softcapping
        return logits_BTV if cap is None else torch.tanh(logits_BTV / cap) * cap

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
