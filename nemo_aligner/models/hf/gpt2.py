"""GPT-2: LayerNorm, GELU, learned positions, tied embeddings, and Conv1D weights stored as [in, out].

The fused `c_attn` projection is split into our q/k/v on import and fused back on export; every
Conv1D weight is transposed both ways.
"""

import torch

from nemo_aligner.models.gpt import GPTConfig
from nemo_aligner.models.hf.family import HFFamily, require, require_plain

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "silu": "silu"}
_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

NAME_MAP = [
    ("transformer.wte.weight", "embedding.weight"),
    ("transformer.wpe.weight", "position_embedding.weight"),
    ("transformer.ln_f.weight", "final_norm.weight"),
    ("transformer.ln_f.bias", "final_norm.bias"),
] + [
    (f"transformer.h.{{i}}.{hf}.{kind}", f"layers.{{i}}.{ours}.{kind}")
    for hf, ours in (("ln_1", "input_norm"), ("ln_2", "post_attention_norm"), ("attn.c_proj", "self_attention.o_proj"),
                     ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj"))
    for kind in ("weight", "bias")
]


class GPT2Family(HFFamily):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    name_map = NAME_MAP
    ignored_hf_names = (r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)", r"lm_head\.weight")

    def config_from_hf(self, hf, source):
        for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(key):
                raise ValueError(f"{source}: {key}=true is not supported")
        if not hf.get("scale_attn_weights", True):
            raise ValueError(f"{source}: scale_attn_weights=false is not supported")
        act = hf.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"{source}: activation_function={act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
        if not hf.get("tie_word_embeddings", True):
            raise ValueError(f"{source}: tie_word_embeddings=false is not supported for gpt2")
        return GPTConfig(
            num_layers=hf["n_layer"], hidden_size=hf["n_embd"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
            num_attention_heads=hf["n_head"], normalization="layernorm",
            layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5), activation=ACTIVATIONS[act],
            position_embedding_type="learned_absolute", max_position_embeddings=hf.get("n_positions", 1024),
            add_qkv_bias=True, add_bias_linear=True, share_embeddings_and_output_weights=True,
            vocab_size=hf["vocab_size"],
        )

    def config_to_hf(self, cfg):
        require(cfg, "gpt2", normalization="layernorm", position_embedding_type="learned_absolute",
                add_qkv_bias=True, add_bias_linear=True, share_embeddings_and_output_weights=True,
                num_query_groups=cfg.num_attention_heads, kv_channels=cfg.hidden_size // cfg.num_attention_heads,
                sliding_window=None)
        require_plain(cfg, "gpt2")
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}.get(cfg.activation)
        if act is None:
            raise ValueError(f"cannot export as model_type='gpt2': model.activation={cfg.activation!r}")
        return {"n_layer": cfg.num_layers, "n_embd": cfg.hidden_size, "n_inner": cfg.ffn_hidden_size,
                "n_head": cfg.num_attention_heads, "layer_norm_epsilon": cfg.layernorm_epsilon,
                "activation_function": act, "n_positions": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
                "tie_word_embeddings": True, "scale_attn_weights": True}

    def from_hf(self, hf_tensors, config=None):
        hf_tensors = {_with_prefix(name): t for name, t in hf_tensors.items()}
        fused = {name: hf_tensors.pop(name) for name in list(hf_tensors) if ".attn.c_attn." in name}
        for name in list(hf_tensors):
            if name.endswith(_CONV1D):
                hf_tensors[name] = hf_tensors[name].t()
        ours, sources = super().from_hf(hf_tensors)
        for name, tensor in fused.items():
            layer, kind = name.split(".")[2], name.rsplit(".", 1)[1]
            parts = tensor.chunk(3, dim=-1)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                key = f"layers.{layer}.self_attention.{proj}.{kind}"
                ours[key], sources[key] = (part.t() if kind == "weight" else part), name
        return ours, sources

    def to_hf(self, our_tensors):
        our_tensors = dict(our_tensors)
        fused = {}
        for name in [n for n in our_tensors if ".self_attention.q_proj." in n]:
            layer, kind = name.split(".")[1], name.rsplit(".", 1)[1]
            parts = [our_tensors.pop(name.replace("q_proj", p)) for p in ("q_proj", "k_proj", "v_proj")]
            fused[f"transformer.h.{layer}.attn.c_attn.{kind}"] = torch.cat(
                [p.t() for p in parts] if kind == "weight" else parts, dim=-1)
        out = super().to_hf(our_tensors)
        for name in list(out):
            if name.endswith(_CONV1D):
                out[name] = out[name].t()
        return {**out, **fused}


def _with_prefix(name: str) -> str:
    # The original OpenAI GPT-2 checkpoints store names without the `transformer.` prefix.
    return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
