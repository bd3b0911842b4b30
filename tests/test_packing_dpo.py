"""Sequence packing for DPO: packed vs padded parity (log-probs, loss, gradients), the packed file
(safetensors, no pickle, exact round trip), the prepare_packed_dpo_dataset.py CLI, packed training
end to end (offline files and online packing) at micro_batch_size 2, and the errors users hit."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_aligner.algorithms.dpo import DPOAlgorithm, DPOSettings, pair_sums
from nemo_aligner.algorithms.reference import precompute_reference
from nemo_aligner.config import ConfigError, DPORunConfig, load_config
from nemo_aligner.config.dpo import DPOConfig
from nemo_aligner.data.dataset import TokenizeSettings
from nemo_aligner.data.layout import DataLayout, pack_examples
from nemo_aligner.data.packing import pack
from nemo_aligner.data.preference.collate import collate_pairs
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.packed_file import (
    PackedPreferenceDataset, load_packed_dataset, read_packed_file, write_packed_file,
)
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.models.heads import ModelWithHead
from nemo_aligner.recipes.dpo import load_layouts, run_dpo
from nemo_aligner.recipes.prepare_packed_dpo import parse_args, prepare_packed_dpo
from tests.helpers import one_process_run

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "nemo_aligner/demo/tokenizer"
TRAIN = ROOT / "nemo_aligner/demo/data/dpo_train.jsonl"
VAL = ROOT / "nemo_aligner/demo/data/dpo_val.jsonl"
SCRIPT = ROOT / "examples/nlp/data/dpo/prepare_packed_dpo_dataset.py"
SEQ = 96  # model.encoder_seq_length of gpt_dpo.yaml: the per-sequence limit when packing
PACK_SIZES = (256, 384)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(TOKENIZER)


def _rows_file(tmp_path):
    """Rows with and without rewards, one long enough to be truncated at SEQ tokens."""
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[:30]]
    rows[1] |= {"chosen_reward": 7.5, "rejected_reward": -1.0}
    rows[2] |= {"chosen_reward": 3.0}
    rows[3]["prompt"][-1]["content"] = "Tell me about colors. " * 40
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _num_rows(path):
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _overrides(out_dir, *extra, pack_sizes=PACK_SIZES):
    return [f"model.data.data_prefix={{train: [{TRAIN}], validation: [{VAL}]}}", f"model.encoder_seq_length={SEQ}",
            f"+tokenizer_path={TOKENIZER}", "+tokenizer_type=huggingface", f"+output_dir={out_dir}",
            f"+pack_sizes=[{','.join(map(str, pack_sizes))}]", "++model.seed=7", *extra]


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """The CLI run as users run it (a subprocess of the example script), two pack sizes, both splits."""
    out = tmp_path_factory.mktemp("packed")
    proc = subprocess.run([sys.executable, str(SCRIPT), *_overrides(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


# ---------------------------------------------------------------------------------------------- parity


def _tiny_model(vocab_size, family):
    arch = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                vocab_size=vocab_size, max_position_embeddings=128)
    if family == "gpt2":
        arch |= dict(position_embedding_type="learned_absolute", normalization="layernorm", activation="gelu",
                     add_qkv_bias=True, add_bias_linear=True)
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**arch))


def _step(algorithm, model, dataset, micro_batches, packed, num_pairs):
    """Loss summed over micro-batches (normalised by all pairs), gradients, per-pair log-probs by dataset index."""
    model.zero_grad(set_to_none=True)
    module = ModelWithHead(model, algorithm.head())
    total, logps = 0.0, {}
    for items in micro_batches:
        batch = algorithm.make_batch(dataset, items, packed)
        token_logps = module(batch.input_ids, labels=batch.labels, segment_ids=batch.segment_ids)
        loss, _ = algorithm.loss(batch, token_logps, num_pairs)
        loss.backward()
        total += loss.item()
        pc, pr, _, _ = pair_sums(batch, token_logps.detach())
        for k, index in enumerate(batch.example_indices.tolist()):
            logps[index] = (pc[k].item(), pr[k].item())
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return total, grads, logps


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_and_padded_give_the_same_logprobs_loss_and_gradients(tok, family):
    ds = PreferenceDataset.from_files([TRAIN], tok, TokenizeSettings(seq_length=SEQ))
    ds.examples = ds.examples[:14]
    rng = np.random.default_rng(0)
    ds.ref_chosen, ds.ref_rejected = -rng.uniform(20, 40, 14), -rng.uniform(20, 40, 14)
    model = _tiny_model(tok.vocab_size, family)
    # sft term and a small chunk size: response lengths matter and chunks cross sequence boundaries
    settings = DPOSettings.from_config(DPOConfig(ref_policy_kl_penalty=0.3, sft_loss_weight=0.5,
                                                 logprob_chunk_size=50))
    algorithm = DPOAlgorithm(settings, tok.pad_id)
    padded = _step(algorithm, model, ds, [list(range(i, min(i + 4, 14))) for i in range(0, 14, 4)], False, 14)
    packs = pack_examples(ds, 6 * SEQ, "first_fit_shuffle", seed=3)
    # several pairs per row, rows of different lengths in a micro-batch (trailing padding; for GPT-2's learned
    # positions it must not count positions past max_position_embeddings)
    assert len(packs) > 2 and len(ds) / len(packs) >= 2
    packed = _step(algorithm, model, ds, [packs[i:i + 2] for i in range(0, len(packs), 2)], True, 14)

    assert sorted(packed[2]) == sorted(padded[2]) == list(range(14))
    for index in range(14):
        np.testing.assert_allclose(packed[2][index], padded[2][index], rtol=0, atol=1e-5)
    assert packed[0] == pytest.approx(padded[0], rel=1e-6)  # fp32 rounding of a sum of ~30
    for name, grad in padded[1].items():
        torch.testing.assert_close(packed[1][name], grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_precomputed_reference_is_the_same_packed_or_padded(tok):
    ds = PreferenceDataset.from_files([TRAIN], tok, TokenizeSettings(seq_length=SEQ))
    ds.examples = ds.examples[:20]
    algorithm = DPOAlgorithm(DPOSettings.from_config(DPOConfig(logprob_chunk_size=64)), tok.pad_id)
    run = one_process_run(_tiny_model(tok.vocab_size, "llama"), algorithm.head())
    precompute_reference(run, DataLayout(ds, list(range(20))), algorithm.make_batch, 3)
    padded = ds.ref_chosen.copy(), ds.ref_rejected.copy()
    packs = pack_examples(ds, 3 * SEQ, "best_fit_decreasing", seed=0)
    precompute_reference(run, DataLayout(ds, packs, packed=True), algorithm.make_batch, 2)
    np.testing.assert_allclose(ds.ref_chosen, padded[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ds.ref_rejected, padded[1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- the file


def test_file_round_trip_is_exact_and_never_unpickles(tmp_path, tok, monkeypatch):
    settings = TokenizeSettings(seq_length=SEQ)
    ds = PreferenceDataset.from_files([_rows_file(tmp_path)], tok, settings, default_rewards=(1.0, 0.0))
    assert ds.report.num_truncated == 1
    packs = pack_examples(ds, 2 * SEQ + 100, "first_fit_shuffle", seed=5)
    path = tmp_path / "p.safetensors"
    write_packed_file(path, ds, packs, pack_size=2 * SEQ + 100, algorithm="first_fit_shuffle", seed=5,
                      seq_length=SEQ, tokenizer_fingerprint=tok.fingerprint())

    def refuse(*args, **kwargs):
        raise AssertionError("the packed file must load without pickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert json.loads(path.read_bytes()[8:8 + header_len])["__metadata__"]["nemo_aligner"]  # plain safetensors
    packed = read_packed_file(path)
    assert packed.arrays["input_ids"].dtype == np.int32
    assert packed.metadata.items() >= {"pack_size": 2 * SEQ + 100, "seed": 5, "num_pairs": 30, "seq_length": SEQ,
                                       "tokenizer_fingerprint": tok.fingerprint(), "format_version": 1}.items()
    loaded = load_packed_dataset([path], tokenizer_fingerprint=tok.fingerprint(), max_pack_size=2 * SEQ + 100)
    assert isinstance(loaded, PackedPreferenceDataset) and loaded.report.num_truncated == 1

    order = [i for p in packs for i in p]  # file order is pack order
    assert packed.arrays["source_rows"].tolist() == ds.source_rows[order].tolist()
    for k, index in enumerate(order):
        a, b = loaded.pairs[k], ds.pairs[index]
        for field in ("prompt", "chosen", "rejected"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (k, field)
        assert (a.chosen_reward, a.rejected_reward, a.truncated) == (b.chosen_reward, b.rejected_reward, b.truncated)
        assert loaded.rewards(k) == ds.rewards(index)
    assert loaded.rewards(order.index(2)) == (3.0, 0.0)  # the row's chosen reward, the default rejected one
    # What the model is fed is identical, pack by pack.
    remap = {index: k for k, index in enumerate(order)}
    for p_orig, p_loaded in zip(packs, loaded.packs):
        assert p_loaded == [remap[i] for i in p_orig]
    a, b = collate_pairs(ds, packs[:3], tok.pad_id, True), collate_pairs(loaded, loaded.packs[:3], tok.pad_id, True)
    for field in ("input_ids", "labels", "seq_index", "segment_ids", "chosen_rewards", "rejected_rewards"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_cli_writes_one_file_per_pack_size_and_split_and_prints_stats(packed_dir):
    out, stdout = packed_dir
    for size in PACK_SIZES:
        for split in ("train", "validation"):
            meta = read_packed_file(out / f"packed_{size}_seed7.{split}.safetensors").metadata
            assert (meta["pack_size"], meta["seed"], meta["algorithm"], meta["split"]) == (
                size, 7, "first_fit_shuffle", split)
            assert meta["num_pairs"] == meta["num_rows"] == _num_rows(TRAIN if split == "train" else VAL)
        assert f"[train] pack_size {size}: " in stdout
    for text in ("packs (lower bound", f"{_num_rows(TRAIN)} pairs", "pairs per pack", "packing efficiency", "truncated 0, dropped 0",
                 "model.global_batch_size=", "model.data.data_impl=packed_jsonl", "model.encoder_seq_length=384"):
        assert text in stdout, text


def test_cli_first_fit_shuffle_is_reproducible(packed_dir, tmp_path, capsys):
    out, _ = packed_dir
    results = prepare_packed_dpo(*parse_args(_overrides(tmp_path)))
    assert results["train"][384]["num_examples"] == _num_rows(TRAIN) and 0 < results["train"][384]["efficiency"] <= 1
    for size in PACK_SIZES:
        for split in ("train", "validation"):
            name = f"packed_{size}_seed7.{split}.safetensors"
            assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    other = tmp_path / "other_seed"
    prepare_packed_dpo(*parse_args(_overrides(other, "+seed=8", pack_sizes=(384,))))
    a = read_packed_file(out / "packed_384_seed7.train.safetensors").arrays["source_rows"]
    b = read_packed_file(other / "packed_384_seed8.train.safetensors").arrays["source_rows"]
    assert a.tolist() != b.tolist()


# ---------------------------------------------------------------------------------------------- training


def _run_config(tmp_path, data: dict, encoder_seq_length: int, **model):
    return load_config({
        "trainer": {"accelerator": "cpu", "dpo": {"max_epochs": 100, "max_steps": 12, "val_check_interval": 6,
                                                  "save_interval": 0, "limit_val_batches": 1.0}},
        "exp_manager": {"explicit_log_dir": str(tmp_path / "run"), "create_tensorboard_logger": False,
                        "progress_bar": False, "create_checkpoint_callback": False},
        "model": {"micro_batch_size": 2, "global_batch_size": 4, "encoder_seq_length": encoder_seq_length,
                  "num_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
                  "num_query_groups": 2, "max_position_embeddings": 128, "tokenizer": {"path": str(TOKENIZER)},
                  "dpo": {"ref_policy_kl_penalty": 0.2},
                  "optim": {"lr": 1e-2, "weight_decay": 0.0,
                            "sched": {"warmup_steps": 1, "constant_steps": 0, "min_lr": 1e-3}},
                  "data": data, **model},
    }, DPORunConfig)


@pytest.fixture
def small_rows(tmp_path):
    """64 pairs of varied lengths with one consistent preference: a tiny model learns it in a few steps."""
    rng = np.random.default_rng(0)
    words = "red green blue sky sea leaf sun rose grass coal snow ink".split()
    rows = [{"prompt": "Q: " + " ".join(rng.choice(words, rng.integers(2, 30))) + "?\nA:",
             "chosen": " Yes, that is right." * int(rng.integers(1, 4)), "rejected": " No." * int(rng.integers(1, 6))}
            for _ in range(64)]
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _check_run(result, log_dir):
    assert result["steps"] == 12 and len(result["history"]) == 12
    assert result["history"][-1]["train/consumed_samples"] == 12 * 4  # the global batch counts packs
    assert all(np.isfinite([r["train/loss"] for r in result["history"]]))
    assert result["initial_val"]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the start
    assert result["val"]["loss"] < 0.5 * result["initial_val"]["loss"]
    assert result["val"]["acc"] > 0.9
    assert list((log_dir / "ref_logps").glob("train-*.safetensors"))  # precomputed on packed items


@pytest.fixture
def no_plot(monkeypatch):
    monkeypatch.setattr("nemo_aligner.training.logging.plot_curves", lambda *args, **kwargs: None)  # saves seconds


def test_training_on_offline_packed_files_with_micro_batch_2(tmp_path, small_rows, capsys, no_plot):
    prepare_packed_dpo(*parse_args([f"model.data.data_prefix={{train: [{small_rows}], validation: [{small_rows}]}}",
                                    f"model.encoder_seq_length={SEQ}", f"+output_dir={tmp_path / 'packed'}",
                                    "+pack_sizes=[320]", "++model.seed=7"]))
    prefix = {split: [str(tmp_path / f"packed/packed_320_seed7.{split}.safetensors")]
              for split in ("train", "validation")}
    cfg = _run_config(tmp_path, {"data_impl": "packed_jsonl", "data_prefix": prefix}, encoder_seq_length=320,
                      seed=7)
    _check_run(run_dpo(cfg), tmp_path / "run")


def test_training_with_online_packing_with_micro_batch_2(tmp_path, tok, small_rows, no_plot):
    data = {"data_prefix": {"train": [str(small_rows)], "validation": [str(small_rows)]}, "packing": True,
            "pack_size": 320}
    cfg = _run_config(tmp_path, data, encoder_seq_length=SEQ)
    train, val, _ = load_layouts(cfg, tok)
    assert train.packed and val.packed and len(train.items) <= len(train.dataset) / 2
    assert train.items == pack(train.dataset.pack_lengths(), 320, "best_fit_decreasing")
    _check_run(run_dpo(cfg), tmp_path / "run")


# ---------------------------------------------------------------------------------------------- errors


def test_packed_file_from_another_tokenizer_is_refused(tmp_path, tok):
    ds = PreferenceDataset.from_files([TRAIN], tok, TokenizeSettings(seq_length=SEQ))
    path = tmp_path / "packed_384_seed1.train.safetensors"
    write_packed_file(path, ds, pack_examples(ds, 384, "best_fit_decreasing", 1), pack_size=384,
                      algorithm="best_fit_decreasing", seed=1, seq_length=SEQ, tokenizer_fingerprint="f00d" * 16)
    cfg = _run_config(tmp_path, {"data_impl": "packed_jsonl", "data_prefix": {"train": [str(path)]}}, 384)
    with pytest.raises(ValueError, match=rf"{path}: packed with another tokenizer \(fingerprint f00df00d.*"
                                         rf"fingerprint {tok.fingerprint()[:16]}"):
        load_layouts(cfg, tok)


def test_pack_size_above_encoder_seq_length_is_refused(packed_dir, tmp_path, tok):
    path = packed_dir[0] / "packed_384_seed7.train.safetensors"
    cfg = _run_config(tmp_path, {"data_impl": "packed_jsonl", "data_prefix": {"train": [str(path)]}}, 256)
    with pytest.raises(ValueError, match=rf"{path}: pack_size=384 > model.encoder_seq_length=256"):
        load_layouts(cfg, tok)


def test_pack_size_below_twice_seq_length_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"\+pack_sizes=150 < 2 x seq_length \(96.*>= 192"):
        parse_args(_overrides(tmp_path, pack_sizes=(256, 150)))
    with pytest.raises(ConfigError, match=r"model.data.pack_size=150 < 2 x seq_length \(96"):
        _run_config(tmp_path, {"packing": True, "pack_size": 150}, SEQ)


def test_example_longer_than_the_pack_is_named(tok):
    with pytest.raises(ValueError, match=r"entry 1 has length 300 > capacity 256"):
        pack([5, 300, 7], 256, "first_fit_shuffle", seed=0)
    ds = PreferenceDataset.from_files([TRAIN], tok, TokenizeSettings(seq_length=SEQ))
    lengths = ds.pack_lengths()
    capacity = int(lengths.max()) - 1
    first = int(np.flatnonzero(lengths > capacity)[0])
    with pytest.raises(ValueError, match=rf"cannot pack pairs into pack_size={capacity}: entry {first} has length "
                                         rf"{lengths[first]} > capacity {capacity}"):
        pack_examples(ds, capacity, "best_fit_decreasing", 0)


def test_wrong_files_for_the_data_impl_are_named(tmp_path, tok, packed_dir):
    path = packed_dir[0] / "packed_384_seed7.train.safetensors"
    cfg = _run_config(tmp_path, {"data_prefix": {"train": [str(path)]}}, 384)
    with pytest.raises(ValueError, match=r"lists packed files .* set model.data.data_impl=packed_jsonl"):
        load_layouts(cfg, tok)
    npy = tmp_path / "packed_4096_seed0.npy"
    npy.write_bytes(b"\x93NUMPY")
    cfg = _run_config(tmp_path, {"data_impl": "packed_jsonl", "data_prefix": {"train": [str(npy)]}}, 384)
    with pytest.raises(ValueError, match=r"pickled object arrays and are not loaded"):
        load_layouts(cfg, tok)
    cfg = _run_config(tmp_path, {"data_impl": "packed_jsonl", "data_prefix": {"train": [str(TRAIN)]}}, 384)
    with pytest.raises(ValueError, match=r"not a packed data file"):
        load_layouts(cfg, tok)
