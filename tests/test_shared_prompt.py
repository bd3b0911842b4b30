"""Shared-prompt pairs (model.data.shared_prompt): one prefix group per pair computes exactly what the
two separate sequences compute.

The layout itself (tokens, labels, positions, branches), then against the two-sequence layout on the
same pairs: per-pair log-prob sums, every preference loss and the gradients agree to 1e-5 for padded
and packed rows, on llama-shaped models with sliding windows shorter than the pairs, learned positions,
soft-capped attention, and every model family of the parity tests; the CUDA varlen formulation (a
gather of each branch's prefix keys) against the mask path with a fake kernel; when the recipe turns
sharing off (LongRoPE past its original context); and the recipe learning the demo with it on.
Tensor and pipeline parallel: tests/test_shared_prompt_distributed.py.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings, pair_sums
from nemo_aligner.config.dpo import DPOConfig
from nemo_aligner.data.batch import IGNORE_INDEX
from nemo_aligner.data.preference.collate import collate_pairs
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.tokenize import TokenizedPair
from nemo_aligner.data.report import RowReport
from nemo_aligner.losses.preference import LOSS_TYPES
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.heads import ModelWithHead
from nemo_aligner.models.layers import attention

V = 64
# (prompt, chosen, rejected) lengths: a one-token prompt (nothing shared), responses longer than the
# prompt and the other way round, a rejected response of one token.
LENGTHS = [(7, 3, 5), (1, 4, 2), (12, 2, 2), (5, 6, 1), (9, 1, 7)]
CONFIGS = {
    "llama_gqa": dict(num_query_groups=2),
    "window_3": dict(num_query_groups=1, sliding_window=3),  # shorter than every pair: positions decide it
    "learned_positions": dict(position_embedding_type="learned_absolute", normalization="layernorm",
                              activation="gelu", add_bias_linear=True, share_embeddings_and_output_weights=True),
    "softcap_window_qk_norm": dict(num_query_groups=2, attn_logit_softcapping=2.0, sliding_window=4, qk_norm="head",
                                   final_logit_softcapping=3.0, norm_placement="sandwich"),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only thrash (conftest.py)


def _pairs(lengths=LENGTHS, vocab=V, seed=0) -> PreferenceDataset:
    rng = np.random.default_rng(seed)
    pairs = [TokenizedPair(*(rng.integers(3, vocab, n, dtype=np.int32) for n in (p, c, r)), None, None)
             for p, c, r in lengths]
    return PreferenceDataset(pairs, RowReport(files=["synthetic"], unit="pairs"))


def _items(n: int, packed: bool) -> list:
    return [list(range(k, min(k + 2, n))) for k in range(0, n, 2)] if packed else list(range(n))


def _model(**overrides) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                              vocab_size=V, init_method_std=0.2, **overrides))


def _run(module, batch):
    return module(batch.input_ids, **batch.model_inputs())


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _token_logps(batch, outputs):
    """Every scored token's log-prob, sequence after sequence (the same order in any layout)."""
    scored = batch.labels != IGNORE_INDEX
    seq, logps = batch.seq_index[scored], outputs.detach()[scored]
    return logps[torch.sort(seq, stable=True).indices]


def _assert_close_grads(got, want, tol=1e-5):
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= tol * max(1.0, w.abs().max().item())


# ------------------------------------------------------------------------------------------ layout
def test_a_pair_is_one_row_prompt_once_last_prompt_token_twice():
    pair = TokenizedPair(np.array([10, 11, 12], np.int32), np.array([20, 21], np.int32), np.array([30], np.int32),
                         None, None)
    dataset = PreferenceDataset([pair, pair], RowReport(files=["x"], unit="pairs"), shared_prompt=True)
    padded = collate_pairs(dataset, [0], pad_id=0, packed=False)
    assert padded.input_ids.tolist() == [[10, 11, 12, 20, 21, 12, 30]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]  # the rejected branch restarts at P - 1
    assert padded.branch_ids.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    assert padded.labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 20, 21, IGNORE_INDEX, 30, IGNORE_INDEX]]
    assert padded.seq_index.tolist() == [[-1, -1, 0, 0, -1, 1, -1]]  # sequence 2k chosen, 2k + 1 rejected
    assert padded.num_real_tokens == 7 == pair.num_shared_tokens == dataset.padded_row_length(0)
    packed = collate_pairs(dataset, [[0, 1]], pad_id=0, packed=True)
    assert packed.segment_ids.tolist() == [[0] * 7 + [1] * 7]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3] * 2]
    assert packed.seq_index[0, 7:].tolist() == [-1, -1, 2, 2, -1, 3, -1]
    assert dataset.pack_lengths().tolist() == [7, 7]  # packing counts the prompt once
    dataset.shared_prompt = False
    assert dataset.pack_lengths().tolist() == [9, 9] and dataset.padded_row_length(0) == 5


def test_padding_a_shared_batch_keeps_what_it_scores():
    dataset = _pairs()
    dataset.shared_prompt = True
    batch = collate_pairs(dataset, [0, 1], pad_id=0, packed=False)
    big = batch.padded(3, batch.input_ids.shape[1] + 5)
    model = _model()
    module = ModelWithHead(model, DPOAlgorithm(DPOSettings.from_config(DPOConfig()), 0).head())
    with torch.no_grad():
        a, b = pair_sums(batch, _run(module, batch)), pair_sums(big, _run(module, big))
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5)
    assert big.branch_ids[:, -5:].eq(0).all() and big.position_ids[:, -5:].eq(0).all()


# ------------------------------------------------------------------------------ exact equivalence
def _references(dataset):
    rng = np.random.default_rng(1)
    dataset.ref_chosen = rng.normal(-20, 3, len(dataset)).astype(np.float32)
    dataset.ref_rejected = rng.normal(-20, 3, len(dataset)).astype(np.float32)


def _loss_and_grads(model, dataset, loss_type, packed, shared):
    dataset.shared_prompt = shared
    settings = DPOSettings.from_config(DPOConfig(preference_loss=loss_type, ref_policy_kl_penalty=0.5,
                                                 sft_loss_weight=0.1))
    algorithm = DPOAlgorithm(settings, pad_id=0)
    module = ModelWithHead(model, algorithm.head())
    model.zero_grad(set_to_none=True)
    total, sums_all, logps = 0.0, {}, []
    for items in [_items(len(dataset), packed)[:2], _items(len(dataset), packed)[2:]]:
        batch = algorithm.make_batch(dataset, items, packed)
        outputs = _run(module, batch)
        loss, sums = algorithm.loss(batch, outputs, len(dataset))
        loss.backward()
        total += loss.item()
        logps.append(torch.stack(pair_sums(batch, outputs.detach())))
        for k, v in sums.items():
            sums_all[k] = sums_all.get(k, 0.0) + float(v)
    return total, sums_all, torch.cat(logps, dim=1), _grads(model)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logprobs_losses_and_gradients_equal_the_two_sequence_layout(name, packed):
    model, dataset = _model(**CONFIGS[name]), _pairs()
    _references(dataset)
    for loss_type in ("dpo", "ipo", "rpo_bwd_kl", "simpo", "orpo") if name != "llama_gqa" else sorted(LOSS_TYPES):
        want = _loss_and_grads(model, dataset, loss_type, packed, shared=False)
        got = _loss_and_grads(model, dataset, loss_type, packed, shared=True)
        assert (got[2] - want[2]).abs().max().item() <= 1e-5, (loss_type, "log-prob sums")
        assert math.isclose(got[0], want[0], rel_tol=1e-5, abs_tol=1e-5), loss_type
        for key, value in want[1].items():
            assert math.isclose(got[1][key], value, rel_tol=1e-5, abs_tol=1e-5), (loss_type, key)
        _assert_close_grads(got[3], want[3])
    assert want[3][0].abs().sum() > 0  # gradients reach the embedding


def test_padded_shared_rows_hold_one_pair_and_fewer_tokens():
    dataset = _pairs()
    unshared = collate_pairs(dataset, list(range(5)), 0, packed=False)
    dataset.shared_prompt = True
    shared = collate_pairs(dataset, list(range(5)), 0, packed=False)
    assert shared.input_ids.shape[0] == unshared.input_ids.shape[0] // 2 == 5
    pairs = dataset.pairs
    assert shared.num_real_tokens == sum(p.num_shared_tokens for p in pairs)
    assert unshared.num_real_tokens == sum(p.num_tokens for p in pairs)
    assert shared.num_real_tokens == unshared.num_real_tokens - sum(len(p.prompt) - 1 for p in pairs)


# -------------------------------------------------------------------------------- model families
def _family_kinds():
    from tests.conftest import FAMILY_KINDS, HF_KINDS

    return HF_KINDS + FAMILY_KINDS


@pytest.mark.parametrize("kind", _family_kinds())
def test_every_model_family_gives_the_same_logprobs_and_gradients(kind, tmp_path):
    from nemo_aligner.models.hf import load_pretrained
    from tests.conftest import tiny_hf_model

    tiny_hf_model(kind).save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    vocab = model.config.vocab_size
    # Phi-3 LongRoPE here has an original context of 32: every sequence stays within it (see the recipe test)
    lengths = [(12, 5, 9), (1, 3, 2), (16, 7, 3)] if kind == "phi3_longrope" else [(20, 5, 9), (1, 3, 2), (16, 12, 3)]
    dataset = _pairs(lengths, vocab=vocab)
    module = ModelWithHead(model, DPOAlgorithm(DPOSettings.from_config(DPOConfig()), 0).head())
    results = {}
    for shared in (False, True):
        for packed in (False, True):
            dataset.shared_prompt = shared
            batch = collate_pairs(dataset, [[0, 1], [2]] if packed else [0, 1, 2], 0, packed)
            model.zero_grad(set_to_none=True)
            outputs = _run(module, batch)
            sums = torch.stack(pair_sums(batch, outputs)[:2])
            (sums[0].sum() - 0.5 * sums[1].sum()).backward()
            results[shared, packed] = _token_logps(batch, outputs), sums.detach(), _grads(model)
    want_tokens, want_sums, want_grads = results[False, False]
    for key, (tokens, sums, grads) in results.items():
        assert (tokens - want_tokens).abs().max().item() <= 1e-5, (kind, key)
        assert torch.allclose(sums, want_sums, rtol=1e-6, atol=1e-5), (kind, key)  # sums of up to ~90 in fp32
        _assert_close_grads(grads, want_grads)


def test_the_recipe_turns_sharing_off_only_where_it_would_not_be_exact(tmp_path):
    from types import SimpleNamespace

    from nemo_aligner.recipes.dpo import shared_prompt_for
    from tests.conftest import tiny_hf_model
    from tests.helpers import dpo_config

    tiny_hf_model("phi3_longrope").save_pretrained(tmp_path / "phi3")  # LongRoPE, original context 32
    tiny_hf_model("llama_tied").save_pretrained(tmp_path / "llama")
    start = lambda path: SimpleNamespace(restore=str(path))  # noqa: E731

    def decide(model, *overrides):
        return shared_prompt_for(dpo_config(tmp_path / "log", *overrides), start(tmp_path / model))

    assert decide("phi3", "model.data.seq_length=32")
    assert not decide("phi3", "model.data.seq_length=33")
    assert decide("llama", "model.data.seq_length=200")
    assert not decide("llama", "model.data.shared_prompt=false")
    # the straddling pair that rule avoids is indeed not exact: its prompt would need both frequency sets
    # (packed rows, where LongRoPE decides per sequence; a padded row decides by its padded length)
    from nemo_aligner.models.hf import load_pretrained

    model = load_pretrained(tmp_path / "phi3")
    module = ModelWithHead(model, DPOAlgorithm(DPOSettings.from_config(DPOConfig()), 0).head())
    dataset = _pairs([(20, 5, 20)], vocab=model.config.vocab_size)  # 25 <= 32 < 40
    got = {}
    with torch.no_grad():
        for shared in (False, True):
            dataset.shared_prompt = shared
            batch = collate_pairs(dataset, [[0]], 0, True)
            got[shared] = torch.stack(pair_sums(batch, _run(module, batch))[:2])
    assert (got[True] - got[False]).abs().max().item() > 1e-4


# ------------------------------------------------------------------------- CUDA varlen formulation
class FakeVarlen:
    """torch's varlen_attn stand-in: SDPA per (query run, key run) with flash's bottom-right alignment
    (query i of Lq against Lk keys is key position i + Lk - Lq) and window (left, right), written from
    flash-attention's definition, independently of the mask path."""

    def __init__(self):
        self.calls = []

    def __call__(self, q_NHD, k_KGD, v_KGD, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                 enable_gqa=False):
        H, G = q_NHD.shape[1], k_KGD.shape[1]
        bq, bk = cu_q.tolist(), cu_k.tolist()
        self.calls.append(dict(separate_keys=cu_q is not cu_k, max_ok=(max_q, max_k) == (
            max(np.diff(bq)), max(np.diff(bk))), kv_heads=G, window=tuple(window_size)))
        left, right = window_size
        outs = []
        for qs, qe, ks, ke in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
            i = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
            j = torch.arange(ke - ks)[None, :]
            allowed = j <= i + right
            if left >= 0:
                allowed &= j >= i - left
            q = q_NHD[qs:qe].transpose(0, 1)
            k, v = (t[ks:ke].transpose(0, 1).repeat_interleave(H // G, dim=0) for t in (k_KGD, v_KGD))
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
        return torch.cat(outs)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("window", [None, 3])
def test_varlen_with_gathered_prefix_keys_matches_the_mask_path(monkeypatch, window, packed):
    fake = FakeVarlen()
    monkeypatch.setattr(attention, "_varlen_attn", fake)
    monkeypatch.setattr(attention, "varlen_available", lambda device, dtype: True)
    model, dataset = _model(num_query_groups=2, sliding_window=window), _pairs()
    dataset.shared_prompt = True
    batch = collate_pairs(dataset, _items(len(dataset), packed), 0, packed).padded(
        3 if packed else 5, 40)  # trailing padding rows and tokens too
    results = []
    for use_varlen in (False, True):
        model.use_varlen = use_varlen
        model.zero_grad(set_to_none=True)
        hidden = model(batch.input_ids, position_ids=batch.position_ids, segment_ids=batch.segment_ids,
                       branch_ids=batch.branch_ids)
        (hidden * torch.linspace(-1, 1, hidden.numel()).view(hidden.shape)).sum().backward()
        results.append((hidden.detach(), _grads(model)))
    assert len(fake.calls) == 2 and all(c["separate_keys"] and c["max_ok"] and c["kv_heads"] == 2 for c in fake.calls)
    assert fake.calls[0]["window"] == ((window - 1, 0) if window else (-1, 0))
    assert (results[0][0] - results[1][0]).abs().max().item() <= 1e-5
    _assert_close_grads(results[1][1], results[0][1])


def test_varlen_context_keys_are_the_prefix_then_the_branch():
    dataset = PreferenceDataset([TokenizedPair(np.array([5, 6, 7], np.int32), np.array([8], np.int32),
                                               np.array([9, 9], np.int32), None, None)],
                                RowReport(files=["x"], unit="pairs"), shared_prompt=True)
    b = collate_pairs(dataset, [0], 0, False)  # [5 6 | 7 8 | 7 9 9]
    ctx = attention._branch_varlen_context(b.segment_ids, b.branch_ids, None, torch.bfloat16)
    assert ctx.cu_seqlens_N1.tolist() == [0, 2, 4, 7]  # query runs: shared, chosen branch, rejected branch
    assert ctx.kv_index_K.tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 4, 5, 6]
    assert ctx.cu_seqlens_k_N1.tolist() == [0, 2, 6, 11] and (ctx.max_seqlen, ctx.max_seqlen_k) == (3, 5)


# ------------------------------------------------------------------------------------ the recipe
RECIPE = ["trainer.dpo.max_steps=3", "trainer.dpo.val_check_interval=3", "trainer.dpo.limit_val_batches=1",
          "exp_manager.create_checkpoint_callback=false", "exp_manager.create_tensorboard_logger=false",
          "model.dpo.sft_loss_weight=0.1", "model.optim.lr=1e-3"]


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_recipe_trains_the_same_steps_with_shared_prompts_on_and_off(tmp_path, monkeypatch, packing):
    from nemo_aligner.recipes.dpo import run_dpo
    from tests.helpers import FAST, comparable, dpo_config, read_metrics

    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    # packed: packs of 2 x seq_length hold whole pairs either way; the same packs are compared (a pack file)
    extra = ["model.data.packing=true", "model.global_batch_size=4", "model.micro_batch_size=2"] if packing else []
    rows = {}
    for shared in (True, False):
        cfg = dpo_config(tmp_path / str(shared), *FAST, *RECIPE, *extra, f"model.data.shared_prompt={shared}")
        if packing:  # the same packs for both: shared pairs are shorter, so they would pack differently
            monkeypatch.setattr("nemo_aligner.data.preference.dataset.PreferenceDataset.pack_lengths",
                                lambda self: np.array([p.num_tokens for p in self.examples], dtype=np.int64))
        run_dpo(cfg)
        rows[shared] = [comparable(r) for r in read_metrics(tmp_path / str(shared))]
    assert [r["step"] for r in rows[True]] == [1, 2, 3] and "val/loss" in rows[True][-1]
    for a, b in zip(rows[True], rows[False]):
        for key, value in b.items():
            if key.startswith("data/"):
                continue
            assert math.isclose(a[key], value, rel_tol=1e-5, abs_tol=1e-6), (a["step"], key, a[key], value)


def test_validation_reference_covers_only_what_validation_reads(tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    from nemo_aligner.recipes.dpo import run_dpo
    from tests.helpers import FAST, dpo_config, read_metrics

    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)
    common = [*FAST, "trainer.dpo.max_steps=1", "exp_manager.create_checkpoint_callback=false",
              "exp_manager.create_tensorboard_logger=false"]
    run_dpo(dpo_config(tmp_path / "two", *common, "trainer.dpo.limit_val_batches=2"))
    # validation reads 2 global batches of 8 pairs: only those 16 of the 80 pairs get a reference pass
    (val_refs,) = [p for p in (tmp_path / "two/ref_logps").iterdir() if p.name.startswith("validation-")]
    chosen = load_file(val_refs)["chosen"]
    assert len(chosen) == 80 and np.isfinite(chosen[:16]).all() and np.isnan(chosen[16:]).all()
    assert np.isfinite(read_metrics(tmp_path / "two")[-1]["val/loss"])
    run_dpo(dpo_config(tmp_path / "off", *common, "trainer.dpo.limit_val_batches=0"))
    assert [p.name.split("-")[0] for p in (tmp_path / "off/ref_logps").iterdir()] == ["train"]
    assert "val/loss" not in read_metrics(tmp_path / "off")[-1]
