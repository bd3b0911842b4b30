"""Shared fixtures: tiny Hugging Face models built locally (nothing is downloaded)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
