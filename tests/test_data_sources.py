"""Data sources (data/sources.py): gzip-compressed jsonl, parquet and arrow files, folders of shards and
Hugging Face `save_to_disk` folders give the same tokenised dataset as the same rows in jsonl, through the
same row-shape detection, and bad input is one message naming the file and line (or row).

pyarrow writes the parquet / arrow fixtures (tests that need it skip without it); `datasets` only writes
genuine save_to_disk folders (those tests skip without it)."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_aligner.data.dataset import TokenizeSettings, file_digest
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.comparisons import read_reward_rows, reward_example
from nemo_aligner.data.preference.reward import reward_pairs_from_files
from nemo_aligner.data.rows import DataError, check_data_files, check_file, read_rows, split_files
from nemo_aligner.data.sft.dataset import SFTDataset
from nemo_aligner.data.sft.tokenize import SFTTokenizeSettings
from nemo_aligner.data.tokenizer import Tokenizer
from tests.helpers import DEMO_TRAIN, DEMO_VAL, FAST, ROOT, dpo_config, read_metrics, sft_config

SFT_TRAIN = ROOT / "nemo_aligner/demo/data/sft_train.jsonl"
SETTINGS = TokenizeSettings(seq_length=64, add_bos=False)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")


def _rows(path=DEMO_TRAIN, n=24):
    """Demo rows; every third with rewards (null elsewhere, so every format has the same columns)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()[:n]]
    for k, row in enumerate(rows):
        row["chosen_reward"], row["rejected_reward"] = (1.5, -0.5) if k % 3 == 0 else (None, None)
    return rows


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_table(path, rows, kind):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, path)
    else:  # the IPC stream format (what datasets writes) or the IPC file format
        with (pa.ipc.new_stream if kind == "stream" else pa.ipc.new_file)(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=5)  # several record batches per file
    return path


def _shards(folder, rows, suffix, sizes=(10, 1, 13)):
    folder.mkdir()
    start = 0
    for k, size in enumerate(sizes):  # written out of name order: reading sorts by name
        name = f"part-{len(sizes) - 1 - k}{suffix}" if suffix == ".parquet" else f"shard_{k}{suffix}"
        _write_table(folder / name, rows[start:start + size], "parquet" if suffix == ".parquet" else "stream")
        start += size
    return folder


def _save_to_disk(folder, rows, num_shards=2):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(folder), num_shards=num_shards)
    return folder


def _hand_saved(folder, rows):
    """A save_to_disk folder built with pyarrow alone (the layout datasets writes: IPC stream shards, state.json
    listing them, dataset_info.json), its state.json listing the shards out of name order: returns the rows in the
    order state.json gives them."""
    folder.mkdir(parents=True)
    names = ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]
    _write_table(folder / names[0], rows[:7], "stream")
    _write_table(folder / names[1], rows[7:], "stream")
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in reversed(names)],
                                                   "_split": None}))
    (folder / "dataset_info.json").write_text("{}")
    return rows[7:] + rows[:7]


def _reordered_parquet_shards(folder, rows):
    """Shards named part-2, part-1, part-0 hold rows 0-9, 10, 11-23: sorted name order reads them reversed."""
    _shards(folder, rows, ".parquet")
    return rows[11:] + rows[10:11] + rows[:10]


def _source(tmp_path, kind, rows):
    """(path of `rows` stored as `kind`, the rows in the order the source holds them)."""
    if kind in ("jsonl.gz", "json.gz"):
        path = tmp_path / f"d.{kind}"
        path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
        return path, rows
    if kind in ("parquet", "stream", "file"):
        return _write_table(tmp_path / f"d.{'parquet' if kind == 'parquet' else 'arrow'}", rows, kind), rows
    if kind == "parquet_shards":
        return tmp_path / "shards", _reordered_parquet_shards(tmp_path / "shards", rows)
    if kind == "arrow_shards":
        return _shards(tmp_path / "shards", rows, ".arrow"), rows
    if kind == "hand_saved":
        return tmp_path / "saved", _hand_saved(tmp_path / "saved", rows)
    assert kind == "save_to_disk"
    return _save_to_disk(tmp_path / "saved", rows), rows


def _same_pairs(a: PreferenceDataset, b: PreferenceDataset):
    assert len(a) == len(b) > 0
    for k, (x, y) in enumerate(zip(a.pairs, b.pairs)):
        assert np.array_equal(x.prompt, y.prompt) and np.array_equal(x.chosen, y.chosen), k
        assert np.array_equal(x.rejected, y.rejected), k
        assert a.rewards(k) == b.rewards(k), k
    assert a.report.shapes == b.report.shapes and a.report.num_tokens == b.report.num_tokens


@pytest.mark.parametrize("kind", ["jsonl.gz", "json.gz", "parquet", "stream", "file", "parquet_shards", "arrow_shards",
                                  "hand_saved", "save_to_disk"])
def test_every_source_gives_the_tokenised_dataset_of_the_same_rows_in_jsonl(tmp_path, tok, kind):
    rows = _rows()
    path, held = _source(tmp_path, kind, rows)
    got = PreferenceDataset.from_files([path], tok, SETTINGS)
    expected = PreferenceDataset.from_files([_jsonl(tmp_path / "same.jsonl", held)], tok, SETTINGS)
    _same_pairs(got, expected)
    assert sum(pair.chosen_reward == 1.5 for pair in got.pairs) == 8  # rewards read from the columns, nulls kept
    assert got.report.shapes == {"nemo_chat": len(rows)}


def test_sft_and_reward_rows_read_from_a_save_to_disk_folder_and_parquet(tmp_path, tok):
    sft_rows = [json.loads(line) for line in SFT_TRAIN.read_text().splitlines()[:12]]
    settings = SFTTokenizeSettings(seq_length=64, add_bos=False)
    saved = _save_to_disk(tmp_path / "sft", sft_rows)
    a = SFTDataset.from_files([saved], tok, settings)
    b = SFTDataset.from_files([_jsonl(tmp_path / "sft.jsonl", sft_rows)], tok, settings)
    assert [(e.ids.tolist(), e.label_mask.tolist()) for e in a.examples] == \
        [(e.ids.tolist(), e.label_mask.tolist()) for e in b.examples]
    assert a.report.shapes == b.report.shapes == {"messages": 12}
    # NeMo-Aligner comparison rows ({"text"} pairs on consecutive rows) from parquet: sources name rows
    texts = [json.loads(line) for line in (ROOT / "nemo_aligner/demo/data/rm_comparisons_train.jsonl").read_text()
             .splitlines()[:8]]
    parquet, jsonl = _write_table(tmp_path / "c.parquet", texts, "parquet"), _jsonl(tmp_path / "c.jsonl", texts)
    pairs, same = (reward_pairs_from_files([path], tok, SETTINGS) for path in (parquet, jsonl))
    assert len(pairs) == 4 and [p.chosen.tolist() for p in pairs.pairs] == [p.chosen.tolist() for p in same.pairs]
    sources = [[reward_example(row, where).source for where, row in read_reward_rows(path)] for path in (parquet, jsonl)]
    assert sources[0][1].endswith("c.parquet:row 3-4") and sources[1][1].endswith("c.jsonl:3-4")
    with pytest.raises(DataError, match=r"c3\.parquet: 3 rows, an odd number.*: row 3 has no rejected partner"):
        reward_pairs_from_files([_write_table(tmp_path / "c3.parquet", texts[:3], "parquet")], tok, SETTINGS)


def test_a_bad_row_is_named_by_its_shard_and_row(tmp_path, tok):
    rows = _rows()
    rows[11]["rejected_response"] = {"role": "assistant", "content": ""}
    folder = _shards(tmp_path / "shards", rows, ".arrow")  # rows 10, 11-23 in shard_1, shard_2
    with pytest.raises(DataError, match=r"shards/shard_2\.arrow:row 1: .*rejected"):
        PreferenceDataset.from_files([folder], tok, SETTINGS)
    with pytest.raises(DataError, match=r"d\.parquet:row 12: .*rejected"):
        PreferenceDataset.from_files([_write_table(tmp_path / "d.parquet", rows, "parquet")], tok, SETTINGS)
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n'))
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:2: malformed JSON"):
        list(read_rows(gz))


def test_a_dataset_dict_folder_gives_each_split_its_own_rows_and_names_the_splits_it_has(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    train, val = _rows(), _rows(DEMO_VAL, 8)
    folder = tmp_path / "hh"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "valid": datasets.Dataset.from_list(val)}).save_to_disk(str(folder))
    prefix = {"train": [str(folder)], "validation": [str(folder)], "test": [str(folder)]}
    assert split_files(prefix, "train") == [str(folder / "train")]
    assert split_files(prefix, "validation") == [str(folder / "valid")]  # validation also matches valid / val / dev
    got = PreferenceDataset.from_files(split_files(prefix, "validation"), tok, SETTINGS)
    _same_pairs(got, PreferenceDataset.from_files([_jsonl(tmp_path / "v.jsonl", val)], tok, SETTINGS))
    with pytest.raises(DataError, match=r"model\.data\.data_prefix\.test: .*hh is a Hugging Face DatasetDict with "
                                        r"splits \['train', 'valid'\], none of them 'test'; name the split's folder"):
        split_files(prefix, "test")
    with pytest.raises(DataError, match=r"hh is a Hugging Face DatasetDict with splits .*; name one split's folder"):
        list(read_rows(folder))


def test_a_dataset_dict_layout_without_the_datasets_package(tmp_path, tok):
    """The DatasetDict layout built by hand (pyarrow only), so the split choice runs where datasets is absent."""
    pytest.importorskip("pyarrow")
    folder = tmp_path / "dd"
    held = {"train": _hand_saved(folder / "train", _rows()), "dev": _hand_saved(folder / "dev", _rows(DEMO_VAL, 9))}
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "dev"]}))
    prefix = {"train": [str(folder)], "validation": [str(folder)], "test": [str(folder)]}
    for split, name in (("train", "train"), ("validation", "dev")):
        got = PreferenceDataset.from_files(split_files(prefix, split), tok, SETTINGS)
        _same_pairs(got, PreferenceDataset.from_files([_jsonl(tmp_path / f"{name}.jsonl", held[name])], tok, SETTINGS))
    with pytest.raises(DataError, match=r"splits \['train', 'dev'\], none of them 'test'; name the split's folder "
                                        r"instead, e\.g\. .*dd/train"):
        check_data_files(prefix)


def test_corrupt_gzip_is_one_message_naming_the_file(tmp_path):
    data = gzip.compress("".join(json.dumps({"prompt": f"p{k}", "chosen": "a", "rejected": "b"}) + "\n"
                                 for k in range(2000)).encode())
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: gzip data corrupt or cut after line \d+ \("):
        list(read_rows(cut))
    garbled = tmp_path / "garbled.jsonl.gz"
    garbled.write_bytes(data[:40] + bytes(b ^ 0x5A for b in data[40:200]) + data[200:])
    with pytest.raises(DataError, match=r"garbled\.jsonl\.gz: gzip data corrupt or cut before the first line"):
        list(read_rows(garbled))
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"plain\.jsonl\.gz: not a gzip file \(it does not start with gzip.s magic bytes\)"):
        list(read_rows(plain))
    misnamed = tmp_path / "misnamed.jsonl"  # gzip bytes under a .jsonl name: read by their magic bytes
    misnamed.write_bytes(gzip.compress(b'{"prompt": "a"}\n'))
    assert [row for _, row in read_rows(misnamed)] == [{"prompt": "a"}]


def test_folders_that_are_not_one_dataset_are_refused_naming_what_was_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match=r"key: .*empty is a directory without data: expected a Hugging Face dataset "
                                        r"folder .* or a folder of \.parquet / \.arrow shards"):
        check_file(empty, "key")
    mixed = tmp_path / "hub"
    mixed.mkdir()
    for name in ("train_prefs-00000-of-00001.parquet", "test_prefs-00000-of-00001.parquet"):
        (mixed / name).write_bytes(b"")
    with pytest.raises(DataError, match=r"hub holds shards of several splits \['test_prefs', 'train_prefs'\]"):
        check_file(mixed, "key")


def test_without_pyarrow_a_parquet_path_names_the_extra_to_install(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)  # import pyarrow now raises ImportError
    with pytest.raises(DataError, match=r"d\.parquet: reading parquet / arrow data .* needs pyarrow: `pip install "
                                        r"nemo_aligner\[parquet\]`"):
        check_data_files({"train": [str(path)]})  # at start-up, before anything is read


def test_a_folder_fingerprint_follows_its_shards(tmp_path):
    pytest.importorskip("pyarrow")
    folder = _shards(tmp_path / "shards", _rows(), ".arrow")
    before = file_digest(folder)
    _write_table(folder / "shard_1.arrow", _rows()[:1], "stream")
    assert file_digest(folder) != before


def test_dpo_trains_on_a_save_to_disk_folder_exactly_as_on_its_jsonl(tmp_path):
    """The same rows as a save_to_disk folder and as jsonl: the same losses step by step."""
    torch.set_num_threads(1)
    from nemo_aligner.recipes.dpo import run_dpo

    rows = [json.loads(line) for line in DEMO_TRAIN.read_text().splitlines()[:64]]
    saved = _save_to_disk(tmp_path / "saved", rows)
    losses = {}
    for name, path in (("saved", saved), ("jsonl", _jsonl(tmp_path / "train.jsonl", rows))):
        run_dpo(dpo_config(tmp_path / name, *FAST, "trainer.dpo.max_steps=3", "trainer.dpo.limit_val_batches=0",
                           f"model.data.data_prefix.train=[{path}]", "exp_manager.create_checkpoint_callback=false",
                           "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false"))
        losses[name] = [row["train/loss"] for row in read_metrics(tmp_path / name) if "train/loss" in row]
    assert len(losses["saved"]) == 3 and losses["saved"] == losses["jsonl"]


def test_sft_trains_on_a_dataset_dict_and_evaluates_its_test_split_once_at_the_end(tmp_path):
    torch.set_num_threads(1)
    datasets = pytest.importorskip("datasets")
    from nemo_aligner.recipes.sft import run_sft

    rows = [json.loads(line) for line in SFT_TRAIN.read_text().splitlines()]
    folder = tmp_path / "chat"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:64]),
                          "test": datasets.Dataset.from_list(rows[64:80])}).save_to_disk(str(folder))
    result = run_sft(sft_config(tmp_path / "run", "model.hidden_size=32", "model.ffn_hidden_size=64",
                                "model.num_layers=1", "model.num_attention_heads=2", "model.num_query_groups=1",
                                "model.micro_batch_size=8", "model.global_batch_size=16", "exp_manager.progress_bar=false",
                                f"model.data.data_prefix={{train: [{folder}], test: [{folder}]}}",
                                "trainer.sft.max_steps=2", "trainer.sft.limit_val_batches=0",
                                "exp_manager.create_checkpoint_callback=false",
                                "exp_manager.checkpoint_callback_params.save_nemo_on_train_end=false"))
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if "test/loss" in r] == [2]  # the test split, once, in the last step's record
    assert result["test"]["loss"] == rows[-1]["test/loss"] and np.isfinite(result["test"]["loss"])
