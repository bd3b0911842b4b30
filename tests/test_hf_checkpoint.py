"""Hugging Face import/export: logits parity with transformers, bit-exact round trips, clear errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.hf import load_pretrained, save_pretrained
from tests.conftest import HF_KINDS, tiny_hf_model


def _ids(seed=1, batch=2, length=40, vocab=128):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", HF_KINDS)
def test_logits_match_transformers(hf_checkpoints, kind):
    folder, hf_model = hf_checkpoints[kind]
    ids = _ids(length=60 if kind != "gpt2" else 50)
    model = load_pretrained(folder).eval()
    with torch.no_grad():
        diff = (model.logits(ids) - hf_model(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{kind}: max abs logit diff {diff}"


@pytest.mark.parametrize("kind", ["llama_gqa_llama3_rope", "qwen2_tied_qkv_bias", "gpt2"])
def test_export_round_trip(hf_checkpoints, tmp_path, kind):
    import transformers

    folder, hf_model = hf_checkpoints[kind]
    model = load_pretrained(folder)
    out = save_pretrained(model, tmp_path / "export")
    # weights bit-exact: the exported safetensors hold exactly the tensors we were given
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    with torch.no_grad():
        assert (reloaded(ids).logits - model.logits(ids)).abs().max().item() <= 1e-5
    again = load_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_from_scratch_config_exports_and_loads_in_transformers(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, vocab_size=50)).eval()
    save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = _ids(vocab=50)
    with torch.no_grad():
        assert (hf(ids).logits - model.logits(ids)).abs().max().item() <= 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = tiny_hf_model("llama_gqa_llama3_rope")
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = load_pretrained(tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        assert (model.logits(ids) - hf_model(ids).logits).abs().max().item() <= 1e-4
    out = save_pretrained(model, tmp_path / "resharded", max_shard_size_bytes=30_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = load_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_load_in_dtype(hf_checkpoints, dtype, torch_dtype):
    folder, hf_model = hf_checkpoints["qwen2"]
    model = load_pretrained(folder, dtype=dtype)
    assert all(p.dtype == torch_dtype for p in model.parameters())
    ref = hf_model.model.embed_tokens.weight.to(torch_dtype)
    assert torch.equal(model.embedding.weight, ref)
    with torch.no_grad():
        logits = model.logits(_ids())
    assert torch.isfinite(logits.float()).all()


def test_bf16_checkpoint_round_trips_bit_exact(hf_checkpoints, tmp_path):
    folder, _ = hf_checkpoints["llama_tied"]
    model = load_pretrained(folder, dtype="bf16")
    out = save_pretrained(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_pretrained(out, dtype="bf16")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


# ---- errors: each names the file and what was expected ----

def _copy(folder, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    return dst


def test_unsupported_model_type(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["llama_tied"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'bert' is not supported; supported types: "
                                         r"gemma2, gemma3_text, gpt2, llama, mistral, olmo2, phi3, qwen2, qwen3"):
        load_pretrained(dst)


def test_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        load_pretrained(tmp_path)


def test_missing_weights_and_pickle_refused(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["llama_tied"][0], tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json.*"
                                                r"pytorch_model\.bin.*never loaded"):
        load_pretrained(dst)


def test_shape_mismatch_names_file_and_tensor(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["llama_gqa_llama3_rope"][0], tmp_path)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' "
                                         r"has shape \[64, 64\] but config\.json implies \[32, 64\]"):
        load_pretrained(dst)


def test_unexpected_and_missing_tensors(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["llama_gqa_llama3_rope"][0], tmp_path)
    tensors = load_file(dst / "model.safetensors")
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor 'model\.extra\.weight'"):
        load_pretrained(dst)
    del tensors["model.norm.weight"]
    save_file(tensors, dst / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing 1 tensor.*final_norm\.weight"):
        load_pretrained(dst)


def test_unsupported_rope_type(hf_checkpoints, tmp_path):
    dst = _copy(hf_checkpoints["llama_tied"][0], tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json: rope type 'yarn' is not supported"):
        load_pretrained(dst)


def test_export_rejects_unrepresentable_architecture(tmp_path):
    model = GPTModel(GPTConfig(normalization="layernorm", position_embedding_type="rope"))
    with pytest.raises(ValueError, match=r"cannot export as model_type='llama': model\.normalization='layernorm'"):
        save_pretrained(model, tmp_path / "x", model_type="llama")
