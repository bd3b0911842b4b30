"""Shared fixtures: tiny Hugging Face models built locally (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny models: more threads only thrash on a shared machine), then back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_hf_model(kind: str):
    """A tiny random `transformers` model of one family/variant, in eval mode."""
    import transformers as tf

    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                  max_position_embeddings=256)
    configs = {
        "llama_gqa_llama3_rope": lambda: tf.LlamaConfig(**common, num_key_value_heads=2, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}),
        "llama_bias_linear_rope": lambda: tf.LlamaConfig(**common, attention_bias=True, mlp_bias=True,
                                                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "llama_tied": lambda: tf.LlamaConfig(**common, num_key_value_heads=1, tie_word_embeddings=True),
        "mistral_window": lambda: tf.MistralConfig(**common, num_key_value_heads=2, head_dim=24, sliding_window=8),
        "qwen2_tied_qkv_bias": lambda: tf.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**common, num_key_value_heads=4, tie_word_embeddings=False),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0),
        **_family_configs(),
    }
    config = configs[kind]()
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # random non-trivial norms and biases so every tensor matters in the comparison
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


HF_KINDS = ["llama_gqa_llama3_rope", "llama_bias_linear_rope", "llama_tied", "mistral_window",
            "qwen2_tied_qkv_bias", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """kind -> (folder with a saved tiny HF model, the live transformers model)."""
    out = {}
    for kind in HF_KINDS:
        model = tiny_hf_model(kind)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, model)
    return out


# ---- the families of tests/test_model_families.py: 3 layers, GQA, vocabulary of the demo tokenizer (400) so
# the same checkpoints run DPO; windows of 8 tokens (shorter than the test sequences); initializer_range 0.2
# so attention scores and logits are large enough for soft-capping to change them.
_FAMILY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=400,
               max_position_embeddings=256, initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=4)
_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(6)],
             "long_factor": [2.0 + 0.3 * i for i in range(6)]}


def _family_configs():
    import transformers as tf

    return {
        "qwen3_window": lambda: tf.Qwen3Config(**_FAMILY, num_key_value_heads=2, head_dim=24, use_sliding_window=True,
                                               sliding_window=8, max_window_layers=1),
        "qwen3_tied": lambda: tf.Qwen3Config(**_FAMILY, num_key_value_heads=1, tie_word_embeddings=True),
        "gemma2_softcap": lambda: tf.Gemma2Config(**_FAMILY, num_key_value_heads=2, head_dim=24, sliding_window=8,
                                                  query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                                  final_logit_softcapping=3.0),
        "gemma2_untied": lambda: tf.Gemma2Config(
            **_FAMILY, num_key_value_heads=1, head_dim=16, sliding_window=8, tie_word_embeddings=False,
            attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
        "gemma3_text": lambda: tf.Gemma3TextConfig(
            **_FAMILY, num_key_value_heads=2, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
            sliding_window_pattern=2, final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "gemma3_untied": lambda: tf.Gemma3TextConfig(**_FAMILY, num_key_value_heads=1, head_dim=16, sliding_window=8,
                                                     tie_word_embeddings=False),
        "phi3_longrope": lambda: tf.Phi3Config(**_FAMILY, num_key_value_heads=2, sliding_window=8,
                                               original_max_position_embeddings=32, partial_rotary_factor=0.75,
                                               rope_scaling=_LONGROPE),
        "phi3_tied": lambda: tf.Phi3Config(**_FAMILY, num_key_value_heads=4, tie_word_embeddings=True),
        "olmo2": lambda: tf.Olmo2Config(**_FAMILY, num_key_value_heads=2),
        "olmo2_tied": lambda: tf.Olmo2Config(**_FAMILY, num_key_value_heads=4, tie_word_embeddings=True),
    }


FAMILY_KINDS = ["qwen3_window", "qwen3_tied", "gemma2_softcap", "gemma2_untied", "gemma3_text", "gemma3_untied",
                "phi3_longrope", "phi3_tied", "olmo2", "olmo2_tied"]
