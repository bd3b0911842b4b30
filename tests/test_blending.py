"""NeMo-style weighted blending (`model.data.data_prefix.train: [0.7, a.jsonl, 0.3, b.jsonl]`, data/blend.py):
the blend holds as many examples as its sources together, each source its share (a short one repeated,
a long one sampled without replacement), evenly interleaved, seeded by model.seed; every task's dataset
gets it through TokenizedDataset.read; malformed lists are one message naming the key."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from nemo_aligner.data.blend import blend_counts, blend_order
from nemo_aligner.data.dataset import TokenizeSettings, files_digest
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.packed_file import load_packed_dataset
from nemo_aligner.data.preference.reward import reward_pairs_from_files
from nemo_aligner.data.rows import BlendFiles, DataError, split_files
from nemo_aligner.data.sft.dataset import SFTDataset
from nemo_aligner.data.sft.tokenize import SFTTokenizeSettings
from nemo_aligner.data.tokenizer import Tokenizer
from tests.helpers import DEMO_TRAIN, FAST, ROOT, dpo_config, read_metrics

SETTINGS = TokenizeSettings(seq_length=64, add_bos=False)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")


def _pairs_file(path, tag: str, n: int):
    """n pairs whose prompt names the source and the row ("a 3"), so each blended pair can be traced back."""
    path.write_text("".join(json.dumps({"prompt": f"{tag} {k}", "chosen": "yes", "rejected": "no"}) + "\n"
                            for k in range(n)))
    return str(path)


def _origins(dataset, tok) -> list[str]:
    return [tok.decode(pair.prompt) for pair in dataset.pairs]


def _blend(tmp_path, tok, weights_and_sizes, seed=1234):
    files = [_pairs_file(tmp_path / f"{tag}.jsonl", tag, n) for tag, (_, n) in weights_and_sizes.items()]
    blend = BlendFiles(files, [w for w, _ in weights_and_sizes.values()], seed)
    return PreferenceDataset.from_files(blend, tok, SETTINGS)


def test_each_source_gets_its_share_a_short_one_repeated_a_long_one_sampled(tmp_path, tok):
    ds = _blend(tmp_path, tok, {"a": (0.7, 30), "b": (0.3, 10)})  # weights 0.7 / 0.3 of N = 40: 28 + 12
    origins = _origins(ds, tok)
    assert len(ds) == 40
    by_source = Counter(o.split()[0] for o in origins)
    assert by_source == {"a": 28, "b": 12}
    a_rows, b_rows = Counter(o for o in origins if o[0] == "a"), Counter(o for o in origins if o[0] == "b")
    assert len(a_rows) == 28 and max(a_rows.values()) == 1  # 28 of a's 30, none twice
    assert len(b_rows) == 10 and sorted(b_rows.values()) == [1] * 8 + [2] * 2  # all of b, 2 of them twice
    # evenly interleaved: every prefix of the blend holds each share to within one example
    is_a = np.cumsum([o[0] == "a" for o in origins])
    k = np.arange(1, 41)
    assert np.all(np.abs(is_a - 0.7 * k) <= 1.0)
    # source_rows still point at each example's own row (a's rows 0..29, then b's 30..39)
    assert all(f"{'a' if row < 30 else 'b'} {row if row < 30 else row - 30}" == o
               for row, o in zip(ds.source_rows, origins))


def test_shares_of_a_larger_seeded_draw_and_weights_that_do_not_sum_to_one(tmp_path, tok):
    ds = _blend(tmp_path, tok, {"a": (2, 500), "b": (1, 37), "c": (1, 163)})  # 0.5 / 0.25 / 0.25 of 700
    by_source = Counter(o.split()[0] for o in _origins(ds, tok))
    for tag, share in (("a", 0.5), ("b", 0.25), ("c", 0.25)):
        assert abs(by_source[tag] / len(ds) - share) <= 1 / len(ds)
    lines = ds.report.summary("train")
    assert "blend of 3 sources (model.data.data_prefix weights, seed 1234): 700 pairs" in lines
    assert "b.jsonl: 37 rows read, 37 pairs; share 0.250 requested, 0.250 obtained: 175 used (each 4x, 27 of them 5x)" \
        in lines
    assert "a.jsonl: 500 rows read, 500 pairs; share 0.500 requested, 0.500 obtained: 350 used (150 unused)" in lines
    # the training sampler's global batches of a shuffled blend hold the shares too (binomial tolerance)
    from nemo_aligner.training.loop import GlobalBatchSampler

    first = GlobalBatchSampler(len(ds), 200, seed=7).global_batch(epoch=0, step_in_epoch=0)
    share_a = np.mean([o.startswith("a") for o in np.array(_origins(ds, tok))[first]])
    assert abs(share_a - 0.5) < 4 * np.sqrt(0.25 / 200)


def test_the_same_seed_gives_the_same_blend_another_seed_another_sample(tmp_path, tok):
    sizes = {"a": (0.5, 40), "b": (0.5, 15)}
    one, again, other = (_origins(_blend(tmp_path, tok, sizes, seed=seed), tok) for seed in (3, 3, 4))
    assert one == again and one != other and Counter(o[0] for o in one) == Counter(o[0] for o in other)


def test_blend_counts_round_to_the_total():
    assert blend_counts([0.5, 0.25, 0.25], 7).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75: largest remainders round up
    assert blend_counts([0.5, 0.5], 3).tolist() == [2, 1]  # ties to the first source
    assert blend_counts([1 / 3] * 3, 10).sum() == 10
    order, shares = blend_order([3, 0], [1.0, 0.0], 0, ["a", "b"], [3, 2], "train")  # a weight-0 source is unused
    assert sorted(order.tolist()) == [0, 1, 2] and shares[1].num_used == 0
    with pytest.raises(DataError, match=r"train: b has no usable examples .* but a weight > 0 in the blend"):
        blend_order([3, 0], [0.5, 0.5], 0, ["a", "b"], [3, 2], "train")


@pytest.mark.parametrize("entries,message", [
    ([0.7, "a.jsonl", 0.3], r"an odd number of entries \(3\)"),
    ([0.7, "a.jsonl", "b.jsonl", 0.3], r"entry 3 \('b\.jsonl'\) must be a weight"),
    ([0.7, 0.3, "a.jsonl", "b.jsonl"], r"entry 2 \(0\.3\) must be a data path after its weight 0\.7"),
    ([-1, "a.jsonl", 2, "b.jsonl"], r"entry 1 \(-1\) must be a weight, a finite number >= 0"),
    ([0, "a.jsonl", 0.0, "b.jsonl"], r"the weights sum to 0"),
    (["a.jsonl", 0.3, "b.jsonl"], r"0\.3 is neither a path nor in a weight's place"),
])
def test_a_malformed_blend_is_one_message_naming_the_key_and_the_format(entries, message):
    with pytest.raises(ValueError, match=r"model\.data\.data_prefix\.train=.*" + message):
        split_files({"train": entries}, "train", seed=1)
    with pytest.raises(ValueError, match=r"\[weight, path, weight, path, \.\.\.\]|neither a path|sum to 0"):
        split_files({"train": entries}, "train", seed=1)


def test_any_split_may_be_blended_and_the_fingerprint_follows_weights_and_seed(tmp_path, tok):
    a, b = _pairs_file(tmp_path / "a.jsonl", "a", 6), _pairs_file(tmp_path / "b.jsonl", "b", 4)
    files = split_files({"validation": [3, a, 1, b]}, "validation", seed=5)
    assert files == [a, b] and files.weights == (0.75, 0.25) and files.seed == 5
    assert split_files({"train": [a, b]}, "train", seed=5) == [a, b] and not isinstance(split_files(
        {"train": [a, b]}, "train"), BlendFiles)
    digests = {files_digest(BlendFiles([a, b], w, s)) for w, s in (((3, 1), 5), ((1, 1), 5), ((3, 1), 6))}
    assert len(digests | {files_digest([a, b])}) == 4  # reference caches and a run's identity change with them
    fingerprints = {PreferenceDataset.from_files(BlendFiles([a, b], w, s), tok, SETTINGS).fingerprint
                    for w, s in (((3, 1), 5), ((1, 1), 5), ((3, 1), 6), ((3, 1), 5))}
    assert len(fingerprints) == 3


def test_sft_and_reward_model_data_are_blended_by_the_same_reader(tmp_path, tok):
    rows = [json.loads(line) for line in (ROOT / "nemo_aligner/demo/data/sft_train.jsonl").read_text().splitlines()]
    (tmp_path / "s1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (tmp_path / "s2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:25]))
    sft = SFTDataset.from_files(BlendFiles([tmp_path / "s1.jsonl", tmp_path / "s2.jsonl"], [1, 1], 0), tok,
                                SFTTokenizeSettings(seq_length=64, add_bos=False))
    assert len(sft) == 25 and [s.num_used for s in sft.report.blend] == [13, 12]
    a, b = _pairs_file(tmp_path / "a.jsonl", "a", 8), _pairs_file(tmp_path / "b.jsonl", "b", 2)
    rm = reward_pairs_from_files(BlendFiles([a, b], [0.5, 0.5], 0), tok, SETTINGS)
    assert Counter(tok.decode(p.prompt)[0] for p in rm.pairs) == {"a": 5, "b": 5}


def test_packed_files_refuse_weights_naming_where_to_blend(tmp_path):
    with pytest.raises(ValueError, match=r"train: blend weights with model\.data\.data_impl=packed_jsonl; blend when "
                                         r"packing \(prepare_packed_dpo_dataset\.py"):
        load_packed_dataset(BlendFiles(["x.safetensors", "y.safetensors"], [1, 1], 0), tokenizer_fingerprint="",
                            max_pack_size=64, name="train")


def test_dpo_trains_on_a_blend_of_two_files_packed_with_a_precomputed_reference(tmp_path):
    torch.set_num_threads(1)
    from nemo_aligner.recipes.dpo import load_layouts, run_dpo

    lines = DEMO_TRAIN.read_text().splitlines()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(lines[:96]) + "\n")
    b.write_text("\n".join(lines[96:112]) + "\n")
    cfg = dpo_config(tmp_path / "run", *FAST, "trainer.dpo.max_steps=3", "trainer.dpo.limit_val_batches=0",
                     f"model.data.data_prefix.train=[0.5,{a},0.5,{b}]", "model.data.packing=true",
                     "model.seed=11", "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false")
    train, _, _ = load_layouts(cfg, Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer"))
    shares = train.dataset.report.blend
    assert [(s.num_examples, s.num_used) for s in shares] == [(96, 56), (16, 56)] and train.packed
    result = run_dpo(cfg)
    losses = [row["train/loss"] for row in read_metrics(tmp_path / "run") if "train/loss" in row]
    assert result["steps"] == 3 and len(losses) == 3 and all(np.isfinite(losses))
    assert list((tmp_path / "run" / "ref_logps").iterdir())  # the precomputed reference covered the blend
