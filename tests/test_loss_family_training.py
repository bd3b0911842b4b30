"""Every preference loss through the DPO step: padded and packed batches give the same loss, metrics
and gradients, and reference-free losses need no reference log-probs at all."""

import json
from pathlib import Path

import pytest
import torch

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings
from nemo_aligner.data.dataset import TokenizeSettings
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.losses.preference import LOSS_TYPES, REFERENCE_FREE_LOSSES
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from tests.helpers import micro_batch_loss

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"discopop": {"discopop_tau": 0.05}, "simpo": {"simpo_gamma": 0.3}, "orpo": {"orpo_lambda": 0.2}}
SMOOTHING = {"dpo": 0.1, "sigmoid": 0.1, "robust": 0.1, "exo_pair": 0.1}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tok = Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")
    rows = [json.loads(line) for line in (ROOT / "nemo_aligner/demo/data/dpo_train.jsonl").read_text().splitlines()[:6]]
    for k, row in enumerate(rows):
        row["chosen_reward"], row["rejected_reward"] = float(k % 3), -1.0
    path = tmp_path_factory.mktemp("d") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = PreferenceDataset.from_files([path], tok, TokenizeSettings(seq_length=96))
    ds.ref_chosen = torch.linspace(-40, -30, len(ds)).numpy()  # stand-in reference log-probs
    ds.ref_rejected = torch.linspace(-35, -38, len(ds)).numpy()
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                               vocab_size=tok.vocab_size, max_position_embeddings=512))
    return tok, ds, model


def _settings(loss_type):
    return DPOSettings(beta=0.2, loss_types=[loss_type], loss_weights=None,
                       label_smoothing=SMOOTHING.get(loss_type, 0.0), average_log_probs=False,
                       sft_average_log_probs=False, gt_reward_scale=1.0, preference_loss_weight=1.0,
                       sft_loss_weight=0.1, loss_kwargs=EXTRA.get(loss_type, {}), chunk_size=16)


def _loss_and_grads(model, algo, batch, n):
    model.zero_grad(set_to_none=True)
    loss, sums = micro_batch_loss(algo, model, batch, n)
    loss.backward()
    return loss.detach(), sums, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padded_and_packed_agree_for_every_loss(setup, loss_type):
    tok, ds, model = setup
    algo = DPOAlgorithm(_settings(loss_type), tok.pad_id)
    n = len(ds)
    padded = algo.make_batch(ds, list(range(n)), packed=False)
    packed = algo.make_batch(ds, [[0, 1, 2], [3, 4], [5]], packed=True)
    loss_a, sums_a, grads_a = _loss_and_grads(model, algo, padded, n)
    loss_b, sums_b, grads_b = _loss_and_grads(model, algo, packed, n)
    assert torch.isfinite(loss_a)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5)
    for key in sums_a:
        assert sums_a[key].item() == pytest.approx(sums_b[key].item(), abs=1e-4), key
    for ga, gb in zip(grads_a, grads_b):
        assert torch.isfinite(ga).all() and torch.allclose(ga, gb, atol=1e-5)


@pytest.mark.parametrize("loss_type", sorted(REFERENCE_FREE_LOSSES))
def test_reference_free_losses_never_read_reference_logprobs(setup, loss_type):
    tok, ds, model = setup
    algo = DPOAlgorithm(_settings(loss_type), tok.pad_id)
    assert not algo.settings.needs_reference
    batch = algo.make_batch(ds, [0, 1], packed=False)
    batch.ref_chosen = batch.ref_rejected = None  # nothing to read: must not fail
    loss, _ = micro_batch_loss(algo, model, batch, 2)
    assert torch.isfinite(loss)
