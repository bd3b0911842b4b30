"""GPTModel behaviour: packed (block-diagonal) attention, position restarts, checkpointing, config errors."""

import pytest
import torch

from nemo_aligner.models.gpt import GPTConfig, GPTModel, positions_from_segments
from nemo_aligner.models.layers.attention import build_attention_context, cu_seqlens_from_segments

CONFIGS = {
    "llama_gqa": GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                           num_query_groups=2, vocab_size=64),
    "gpt2_like": GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=64,
                           normalization="layernorm", activation="gelu_tanh", position_embedding_type="learned_absolute",
                           add_qkv_bias=True, add_bias_linear=True, share_embeddings_and_output_weights=True),
}


def _model(name):
    torch.manual_seed(0)
    return GPTModel(CONFIGS[name]).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pack_of_three_equals_each_sequence_alone(name):
    model = _model(name)
    lengths = [5, 9, 4]
    seqs = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    packed = torch.cat(seqs)[None]
    segments = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    with torch.no_grad():
        out = model.logits(packed, segment_ids=segments)[0]
        start = 0
        for seq in seqs:
            alone = model.logits(seq[None])[0]
            assert (out[start:start + len(seq)] - alone).abs().max().item() <= 1e-5
            start += len(seq)


def test_packed_micro_batch_of_two_rows_with_padding():
    model = _model("llama_gqa")
    rows = [[3, 6], [7, 2]]  # two packs, each with two sequences; row 0 padded with a third segment
    T = 10
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(0))
    segs = torch.tensor([[0] * 3 + [1] * 6 + [2], [0] * 7 + [1] * 2 + [2]])
    with torch.no_grad():
        out = model.logits(ids, segment_ids=segs)
        for b, lengths in enumerate(rows):
            start = 0
            for n in lengths:
                alone = model.logits(ids[b:b + 1, start:start + n])[0]
                assert (out[b, start:start + n] - alone).abs().max().item() <= 1e-5
                start += n


def test_positions_restart_per_segment():
    segs = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert positions_from_segments(segs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_cu_seqlens_for_the_varlen_kernel():
    segs = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    cu, max_len = cu_seqlens_from_segments(segs)
    assert cu.tolist() == [0, 2, 5, 6, 10] and max_len == 4


def test_cpu_falls_back_to_the_mask_path():
    segs = torch.tensor([[0, 0, 1]])
    ctx = build_attention_context(segs, 3, None, torch.device("cpu"), torch.bfloat16, use_varlen=True)
    assert ctx.cu_seqlens_N1 is None
    assert ctx.mask_B1TT[0, 0].tolist() == [[True, False, False], [True, True, False], [False, False, True]]


def test_activation_checkpointing_gives_same_gradients():
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model = _model("llama_gqa").train()
        model.config.activations_checkpointing = ckpt
        model.logits(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_attention_heads=4, num_query_groups=3), r"model\.num_attention_heads=4 is not divisible by model\.num_query_groups=3"),
    (dict(normalization="batchnorm"), r"model\.normalization='batchnorm'; expected one of \['rmsnorm', 'layernorm'\]"),
    (dict(activation="tanh"), r"model\.activation='tanh'; expected one of"),
    (dict(rope_scaling="yarn"), r"model\.rope_scaling='yarn'"),
    (dict(hidden_size=0), r"model\.hidden_size=0; expected a positive integer"),
])
def test_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**kwargs)


def test_learned_positions_beyond_table_is_an_error():
    model = GPTModel(GPTConfig(position_embedding_type="learned_absolute", max_position_embeddings=8))
    with pytest.raises(ValueError, match=r"position 9 >= model\.max_position_embeddings=8"):
        model(torch.zeros(1, 10, dtype=torch.long))
