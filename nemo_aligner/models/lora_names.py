"""LoRA target names (`model.peft.lora_tuning.target_modules`) and init methods, without torch, so a
config is validated without importing it."""

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
