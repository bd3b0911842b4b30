"""GPTConfig and GPTModel: one plain-PyTorch decoder for the Llama/Mistral/Qwen2 and GPT-2 families.

The model knows nothing of parallelism or losses. It returns hidden states; the output projection is
a separate step (`output_weight`, `logits`) so log-probs can be computed a chunk at a time.
Layers live in a ModuleDict keyed by their global index so pipeline stages can drop modules and keep
checkpoint names. A stage without `embedding` takes hidden states as input; one without `final_norm`
returns un-normalised hidden states.

Shapes: B batch, T tokens, E hidden size, V vocabulary.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nemo_aligner.models.layers.attention import AttentionContext, SelfAttention, build_attention_context
from nemo_aligner.models.layers.mlp import ACTIVATIONS, MLP, NORMALIZATIONS, RMSNorm, make_norm
from nemo_aligner.models.layers.rope import ROPE_SCALING_TYPES, rope_cos_sin, rope_inv_freq

POSITION_EMBEDDING_TYPES = ("rope", "learned_absolute")


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
    activation: str = "swiglu"  # swiglu | geglu | reglu | gelu | gelu_tanh | relu | squared-relu | silu
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_base: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_position_embeddings: int = 8192  # llama3 only
    max_position_embeddings: int = 2048
    add_qkv_bias: bool = False
    add_bias_linear: bool = False  # attention output and MLP biases
    share_embeddings_and_output_weights: bool = False
    vocab_size: int = 256
    sliding_window: int | None = None  # Mistral-style local attention window (tokens); None = full
    init_method_std: float = 0.02
    activations_checkpointing: bool = False  # recompute each transformer layer in backward

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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"model.{key}={value!r}; expected one of {list(choices)}")


class TransformerLayer(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_norm = make_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.self_attention = SelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels,
            qkv_bias=cfg.add_qkv_bias, out_bias=cfg.add_bias_linear,
        )
        self.post_attention_norm = make_norm(cfg.normalization, cfg.hidden_size, cfg.layernorm_epsilon)
        self.mlp = MLP(cfg.hidden_size, cfg.ffn_hidden_size, cfg.activation, cfg.add_bias_linear)

    def forward(self, x_BTE, cos_sin, ctx: AttentionContext):
        x_BTE = x_BTE + self.self_attention(self.input_norm(x_BTE), cos_sin, ctx)
        return x_BTE + self.mlp(self.post_attention_norm(x_BTE))


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
        self.layers = nn.ModuleDict({str(i): TransformerLayer(config) for i in range(config.num_layers)})
        self.final_norm = make_norm(config.normalization, config.hidden_size, config.layernorm_epsilon)
        self.output_layer = None
        if not config.share_embeddings_and_output_weights:
            self.output_layer = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.inv_freq = rope_inv_freq(
            config.kv_channels, config.rotary_base, config.rope_scaling, config.rope_scaling_factor,
            config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_position_embeddings,
        )
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
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    @property
    def output_weight(self) -> torch.Tensor:
        """[V, E] weight of the output projection (the embedding when they are shared)."""
        return self.embedding.weight if self.output_layer is None else self.output_layer.weight

    def forward(self, inputs, position_ids=None, segment_ids=None):
        """inputs: token ids [B, T] (first stage) or hidden states [B, T, E]; returns hidden states [B, T, E].

        position_ids [B, T]: default 0..T-1, or restarting per sequence when segment_ids is given.
        segment_ids [B, T]: packed-sequence ids; attention is then block-diagonal causal.
        """
        B, T = inputs.shape[:2]
        if position_ids is None:
            position_ids = (positions_from_segments(segment_ids) if segment_ids is not None
                            else torch.arange(T, device=inputs.device).expand(B, T))
        x_BTE = self._embed(inputs, position_ids)
        cos_sin = None
        if self.config.position_embedding_type == "rope":
            cos_sin = rope_cos_sin(self.inv_freq, position_ids, x_BTE.dtype)
        ctx = build_attention_context(segment_ids, T, self.config.sliding_window, x_BTE.device, x_BTE.dtype,
                                      use_varlen=self.use_varlen)
        for layer in self.layers.values():
            if self.config.activations_checkpointing and torch.is_grad_enabled():
                x_BTE = checkpoint(layer, x_BTE, cos_sin, ctx, use_reentrant=False)
            else:
                x_BTE = layer(x_BTE, cos_sin, ctx)
        return self.final_norm(x_BTE) if self.final_norm is not None else x_BTE

    def _embed(self, inputs, position_ids):
        if self.embedding is None:
            return inputs
        x_BTE = self.embedding(inputs)
        if self.position_embedding is not None:
            if int(position_ids.max()) >= self.config.max_position_embeddings:
                raise ValueError(f"position {int(position_ids.max())} >= model.max_position_embeddings="
                                 f"{self.config.max_position_embeddings}")
            x_BTE = x_BTE + self.position_embedding(position_ids)
        return x_BTE

    def logits(self, input_ids, position_ids=None, segment_ids=None) -> torch.Tensor:
        """Full logits [B, T, V]; for users and tests (training computes log-probs in chunks instead)."""
        hidden_BTE = self(input_ids, position_ids=position_ids, segment_ids=segment_ids)
        return F.linear(hidden_BTE, self.output_weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
