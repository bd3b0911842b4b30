"""CUDA fast paths checked on CPU: each must agree with the CPU path it replaces.

- varlen (flash) attention: the CUDA kernel is replaced by a fake that runs SDPA on each unpacked
  sequence with flash's documented window semantics, so the flatten / cu_seqlens / GQA / window
  plumbing is compared with the block-diagonal mask path; plus the decision that picks the kernel.
- bf16 autocast: fp32 master weights, fp32 log-probs, agreement with fp32 within bf16 rounding.
- fused AdamW: which kwargs build_optimizer chooses for CUDA parameters (fake ones: no GPU here) and
  plain CPU ones (fused there too).
- torch.compile per block: same outputs and gradients as eager, also under activation checkpointing.
"""

import copy
import os
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nemo_aligner.config.dpo import DPOModelConfig as ModelConfig
from nemo_aligner.losses.logprobs import dense_token_logprobs, sequence_sums, token_logprobs
from nemo_aligner.models.compile import compile_blocks, transformer_blocks
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.layers import attention
from nemo_aligner.recipes.skeleton import autocast_for, build_model
from nemo_aligner.training.optim import build_optimizer

V = 64
CONFIGS = {
    "gqa": dict(num_query_groups=2),
    "mha_qkv_bias": dict(add_qkv_bias=True),
    "gqa_sliding_window": dict(num_query_groups=1, sliding_window=3),
}


def _model(num_layers=2, **overrides) -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(num_layers=num_layers, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    vocab_size=V, **overrides)
    return GPTModel(cfg)


def _packed_batch():
    """Two rows of 12 tokens: row 0 holds sequences of 5 and 6 plus one padding token, row 1 one of 12."""
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    segs = torch.tensor([[0] * 5 + [1] * 6 + [2], [0] * 12])
    return ids, segs


class FakeVarlen:
    """Stands in for torch.nn.attention.varlen.varlen_attn: SDPA on each sequence of the flat batch.

    The window follows flash-attention's definition (query i sees keys i-left .. i+right, -1 = no
    limit), written independently of the mask path so the test checks our translation to it.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, q_NHD, k_NGD, v_NGD, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
        H, G = q_NHD.shape[1], k_NGD.shape[1]
        bounds = cu_seq_q.tolist()
        lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        self.calls.append(dict(dtypes={q_NHD.dtype, k_NGD.dtype, v_NGD.dtype}, cu_dtype=cu_seq_q.dtype,
                               same_cu=cu_seq_q is cu_seq_k, max_ok=max_q == max_k == max(lengths),
                               total_ok=bounds[-1] == q_NHD.shape[0] == k_NGD.shape[0], kv_heads=G,
                               gqa_flag_ok=enable_gqa == (H != G), window=tuple(window_size)))
        left, right = window_size
        outs = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            i = torch.arange(end - start)[:, None]
            j = torch.arange(end - start)[None, :]
            allowed = (j <= i + right) if right >= 0 else torch.ones_like(i == j)
            if left >= 0:
                allowed = allowed & (j >= i - left)
            q = q_NHD[start:end].transpose(0, 1)
            k = k_NGD[start:end].transpose(0, 1).repeat_interleave(H // G, dim=0)
            v = v_NGD[start:end].transpose(0, 1).repeat_interleave(H // G, dim=0)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
        return torch.cat(outs)


@pytest.fixture
def fake_varlen(monkeypatch):
    """Force the varlen branch on CPU with the fake kernel."""
    fake = FakeVarlen()
    monkeypatch.setattr(attention, "_varlen_attn", fake)
    monkeypatch.setattr(attention, "varlen_available", lambda device, dtype: True)
    return fake


def _logits_and_grads(model, ids, segs):
    model.zero_grad(set_to_none=True)
    logits = model.logits(ids, segment_ids=segs)
    (logits.float().logsumexp(-1) * torch.linspace(0.5, 1.5, ids.numel()).view(ids.shape)).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------- varlen attention
@pytest.mark.parametrize("name", list(CONFIGS))
def test_varlen_plumbing_matches_the_mask_path(name, fake_varlen):
    model = _model(**CONFIGS[name])
    ids, segs = _packed_batch()
    model.use_varlen = False
    ref_logits, ref_grads = _logits_and_grads(model, ids, segs)
    assert not fake_varlen.calls
    model.use_varlen = True
    logits, grads = _logits_and_grads(model, ids, segs)
    assert len(fake_varlen.calls) == model.config.num_layers
    call = fake_varlen.calls[0]
    assert call["cu_dtype"] == torch.int32 and call["same_cu"] and call["max_ok"] and call["total_ok"]
    assert call["gqa_flag_ok"] and call["kv_heads"] == model.config.num_query_groups  # K/V not repeated
    window = model.config.sliding_window
    assert call["window"] == ((window - 1, 0) if window else (-1, 0))
    assert (logits - ref_logits).abs().max() <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).abs().max() <= 1e-5


def test_varlen_under_bf16_autocast_gets_one_half_dtype_and_matches_the_mask_path(fake_varlen):
    # Under bf16-mixed, q/k come out of RoPE in fp32 and v in bf16; the kernel needs all three in bf16.
    model = _model(num_query_groups=2)
    ids, segs = _packed_batch()
    with autocast_for("bf16-mixed", torch.device("cpu")):
        model.use_varlen = False
        ref = model.logits(ids, segment_ids=segs).float()
        model.use_varlen = True
        out = model.logits(ids, segment_ids=segs).float()
    assert fake_varlen.calls and all(c["dtypes"] == {torch.bfloat16} for c in fake_varlen.calls)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.skipif(attention._varlen_attn is None, reason="this torch build has no varlen_attn")
@pytest.mark.parametrize("window", [None, 3])
def test_the_real_varlen_kernel_accepts_our_call_on_meta_tensors(window):
    # Meta tensors run the op's registered fake kernel: the real wrapper's argument checks, the op
    # schema and its autograd formula see exactly our call, forward and backward, without a GPU.
    attn = attention.SelfAttention(32, 4, 2, 8, qkv_bias=False, out_bias=False).to("meta")
    x = torch.empty(2, 6, 32, device="meta", requires_grad=True)
    ctx = attention.AttentionContext(cu_seqlens_N1=torch.empty(4, dtype=torch.int32, device="meta"), max_seqlen=6,
                                     sliding_window=window, compute_dtype=torch.bfloat16)
    out = attn(x, None, ctx)
    assert out.shape == (2, 6, 32)
    out.float().sum().backward()
    assert x.grad.shape == x.shape and attn.k_proj.weight.grad.shape == attn.k_proj.weight.shape


def test_varlen_decision():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device descriptor needs no GPU
    kernel = attention._varlen_attn is not None
    assert attention.varlen_available(cuda, torch.bfloat16) == kernel
    assert attention.varlen_available(cuda, torch.float16) == kernel
    assert not attention.varlen_available(cuda, torch.float32)
    assert not attention.varlen_available(cpu, torch.bfloat16)
    assert attention.attention_dtype(cpu, torch.float32) == torch.float32
    assert attention.attention_dtype(torch.device("meta"), torch.float32) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.attention_dtype(cpu, torch.float32) == torch.bfloat16


def test_decision_uses_the_autocast_dtype_not_the_fp32_weights(monkeypatch):
    seen = []
    monkeypatch.setattr(attention, "varlen_available", lambda device, dtype: seen.append(dtype) or True)
    segs = torch.tensor([[0, 0, 1]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = attention.build_attention_context(segs, 3, None, torch.device("cpu"), torch.float32)
    assert seen == [torch.bfloat16] and ctx.compute_dtype == torch.bfloat16
    assert ctx.cu_seqlens_N1.tolist() == [0, 2, 3] and ctx.max_seqlen == 2 and ctx.mask_B1TT is None
    off = attention.build_attention_context(segs, 3, None, torch.device("cpu"), torch.float32, use_varlen=False)
    assert off.cu_seqlens_N1 is None and off.mask_B1TT is not None


def test_cpu_fp32_and_bf16_fall_back_to_the_mask_path():
    segs = torch.tensor([[0, 0, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        ctx = attention.build_attention_context(segs, 3, None, torch.device("cpu"), dtype)
        assert ctx.cu_seqlens_N1 is None and ctx.mask_B1TT is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ctx = attention.build_attention_context(segs, 3, None, torch.device("cpu"), torch.float32)
    assert ctx.cu_seqlens_N1 is None


# ------------------------------------------------------------------------------------- bf16 autocast
def _seq_logps(model, ids, segs):
    hidden = model(ids, segment_ids=segs)
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    seq_index = torch.where(labels == -100, -1, segs)
    seq_index = seq_index + torch.tensor([[0], [3]])  # distinct sequence ids across the two rows
    token_logps = dense_token_logprobs(hidden, model.output_weight, labels, chunk_size=5)
    return sequence_sums(token_logps, labels, seq_index.clamp(min=0), 6)


def test_bf16_mixed_keeps_fp32_master_weights_and_fp32_logprobs():
    model = _model(num_query_groups=2)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    ids, segs = _packed_batch()
    with autocast_for("bf16-mixed", torch.device("cpu")):
        hidden = model(ids, segment_ids=segs)
        sums, counts = _seq_logps(model, ids, segs)
    assert hidden.dtype == torch.float32  # the residual stream stays fp32; matmuls ran in bf16
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    sums.sum().backward()
    optimizer.step()
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
    for state in optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32


def test_logprob_chunks_are_fp32_even_from_bf16_inputs():
    hidden = torch.randn(10, 16, dtype=torch.bfloat16)
    weight = torch.randn(50, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (10,))
    logps = token_logprobs(hidden, weight, targets, chunk_size=4)
    assert logps.dtype == torch.float32
    ref = torch.log_softmax((hidden.float() @ weight.float().T).double(), -1).gather(1, targets[:, None])[:, 0]
    assert ((logps.double() - ref).norm() / ref.norm()).item() < 1e-2


def test_bf16_autocast_forward_agrees_with_fp32():
    model = _model(num_query_groups=2)
    ids, segs = _packed_batch()
    with torch.no_grad():
        ref, _ = _seq_logps(model, ids, segs)
        with autocast_for("bf16-mixed", torch.device("cpu")):
            out, _ = _seq_logps(model, ids, segs)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 1e-2  # bf16 matmuls: not bit-equal, but within bf16 rounding


# ------------------------------------------------------------------------------------- fused AdamW
class _RecordingAdamW:
    def __init__(self, groups, **kwargs):
        self.groups, self.kwargs = groups, kwargs


def _fake_params(*device_types):
    return [SimpleNamespace(device=torch.device(t), requires_grad=True, ndim=2) for t in device_types]


def test_fused_adamw_is_chosen_when_every_parameter_is_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _RecordingAdamW)
    kw = dict(lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert build_optimizer(_fake_params("cuda", "cuda"), **kw).kwargs["fused"] is True
    assert build_optimizer(_fake_params("cuda", "cpu"), **kw).kwargs["fused"] is None  # torch's default (foreach)
    assert build_optimizer(_fake_params("cuda"), fused=False, **kw).kwargs["fused"] is False  # explicit wins


def test_real_cpu_optimizer_is_fused_but_not_over_sharded_parameters():
    optimizer = build_optimizer(_model(num_layers=1), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert optimizer.defaults["fused"]  # plain CPU tensors: torch's fused CPU kernel (bench: faster, less memory)
    from nemo_aligner.training.optim import _fused_by_default

    assert not _fused_by_default([SimpleNamespace(device=torch.device("cpu"), data=object())])  # e.g. a DTensor


# ------------------------------------------------------------------------------------- torch.compile
def test_compiled_block_matches_eager_with_and_without_activation_checkpointing():
    # aot_eager traces the block with dynamo and AOT autograd (the graph inductor would get) in about a
    # second; inductor itself takes ~40 s for one tiny layer on this CPU (see the opt-in test below).
    eager = _model(num_layers=1, num_query_groups=2)
    ids, segs = _packed_batch()
    ref_logits, ref_grads = _logits_and_grads(eager, ids, segs)
    for checkpointing in (False, True):
        model = copy.deepcopy(eager)
        model.config.activations_checkpointing = checkpointing
        assert compile_blocks(model, backend="aot_eager", fullgraph=True) == 1
        logits, grads = _logits_and_grads(model, ids, segs)
        assert (logits - ref_logits).abs().max() <= 1e-6
        for g, ref in zip(grads, ref_grads):
            assert (g - ref).abs().max() <= 1e-6
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoint names unchanged


def test_deep_copy_of_a_compiled_model_uses_its_own_weights():
    model = _model(num_layers=1)
    compile_blocks(model, backend="aot_eager")
    ids, _ = _packed_batch()
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for p in copied.parameters():
            p.mul_(0.5)
        assert not torch.allclose(model.logits(ids), copied.logits(ids))
        fresh = _model(num_layers=1)
        fresh.load_state_dict(copied.state_dict())
        assert torch.allclose(fresh.logits(ids), copied.logits(ids), atol=1e-6)


@pytest.mark.skipif(not os.environ.get("NEMO_ALIGNER_SLOW_TESTS"), reason="inductor on CPU takes ~40 s; "
                    "set NEMO_ALIGNER_SLOW_TESTS=1")
def test_inductor_compiled_block_matches_eager():
    eager = _model(num_layers=1, num_query_groups=2)
    ids, segs = _packed_batch()
    ref_logits, ref_grads = _logits_and_grads(eager, ids, segs)
    model = copy.deepcopy(eager)
    start = time.perf_counter()
    compile_blocks(model)
    logits, grads = _logits_and_grads(model, ids, segs)
    print(f"inductor compile + first step: {time.perf_counter() - start:.1f}s")
    assert (logits - ref_logits).abs().max() <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert (g - ref).abs().max() <= 1e-5


def test_model_compile_key_compiles_the_blocks_in_build_model():
    assert ModelConfig().compile is False
    cfg = ModelConfig(compile=True, num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4)
    model = build_model(cfg, None, SimpleNamespace(vocab_size=V), torch.device("cpu"))
    blocks = transformer_blocks(model)
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    plain = build_model(ModelConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4), None,
                        SimpleNamespace(vocab_size=V), torch.device("cpu"))
    assert all(b._compiled_call_impl is None for b in transformer_blocks(plain))


def test_compile_of_a_model_without_blocks_is_an_error():
    with pytest.raises(ValueError, match="model.compile"):
        compile_blocks(torch.nn.Linear(2, 2))
