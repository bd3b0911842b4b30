"""Preference data: every accepted row shape, exact prompt/response boundaries, over-length policy,
and bad input named by file and line."""

import json
from pathlib import Path

import numpy as np
import pytest

from nemo_aligner.data.batch import IGNORE_INDEX
from nemo_aligner.data.dataset import TokenizeSettings
from nemo_aligner.data.preference.collate import collate_pairs
from nemo_aligner.data.preference.dataset import PreferenceDataset
from nemo_aligner.data.preference.rows import PreferenceColumns, read_preference_file
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.training.loop import GlobalBatchSampler

ROOT = Path(__file__).resolve().parents[1]
NEMO_DPO = ROOT / "tests/data/nemo_aligner_format/dummy-dpo.jsonl"
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _dataset(tmp_path, tok, rows, keys=PreferenceColumns(), **settings):
    settings = TokenizeSettings(**{"seq_length": 64, "add_bos": False, **settings})
    return PreferenceDataset.from_files([_write(tmp_path, rows)], tok, settings, keys)


def test_nemo_legacy_rows_are_used_verbatim(tok):
    examples = read_preference_file(NEMO_DPO)
    assert len(examples) == 100  # 99 newline-terminated rows plus a final unterminated one
    ex = examples[0]
    assert ex.prompt.startswith("<extra_id_0>System") and ex.chosen == "This is the chosen response.\n<extra_id_1>"
    ds = PreferenceDataset.from_files([NEMO_DPO], tok, TokenizeSettings(seq_length=128, add_bos=False))
    pair = ds.pairs[0]
    assert tok.decode(pair.prompt) == ex.prompt
    assert tok.decode(pair.chosen[:-1]) == ex.chosen and pair.chosen[-1] == tok.eos_id  # eos appended


@pytest.mark.parametrize("row,expected_prompt", [
    # NeMo-Aligner chat: prompt messages, one response message each
    ({"prompt": MSGS, "chosen_response": {"role": "assistant", "content": "Blue."},
      "rejected_response": {"role": "assistant", "content": "Red."}}, MSGS),
    # TRL conversational with explicit prompt
    ({"prompt": MSGS, "chosen": [{"role": "assistant", "content": "Blue."}],
      "rejected": [{"role": "assistant", "content": "Red."}]}, MSGS),
    # TRL conversational, implicit prompt (shared leading turns)
    ({"chosen": MSGS + [{"role": "assistant", "content": "Blue."}],
      "rejected": MSGS + [{"role": "assistant", "content": "Red."}]}, MSGS),
])
def test_message_rows_go_through_the_chat_template(tmp_path, tok, row, expected_prompt):
    ds = _dataset(tmp_path, tok, [row])
    pair = ds.pairs[0]
    assert tok.decode(pair.prompt) == tok.apply_chat_template(expected_prompt, add_generation_prompt=True)
    assert tok.decode(pair.chosen) == "Blue.<|im_end|>\n"
    assert tok.decode(pair.rejected) == "Red.<|im_end|>\n"


def test_trl_string_rows_and_rewards(tmp_path, tok):
    ds = _dataset(tmp_path, tok, [{"prompt": "Q: sky?\nA:", "chosen": " blue", "rejected": " red",
                                   "chosen_reward": 7, "rejected_reward": 2},
                                  {"prompt": "Q: sun?\nA:", "chosen": " yellow", "rejected": " black"}])
    assert tok.decode(ds.pairs[0].prompt) == "Q: sky?\nA:"
    assert ds.rewards(0) == (7.0, 2.0) and ds.rewards(1) == (1.0, 0.0)


def test_roll_rows_with_custom_keys_and_input(tmp_path, tok):
    row = {"instruction": "Name the color", "input": "of the sky.", "good": "Blue", "bad": "Red"}
    ds = _dataset(tmp_path, tok, [row], keys=PreferenceColumns(prompt="instruction", chosen="good", rejected="bad"))
    assert tok.decode(ds.pairs[0].prompt) == "Name the color\nof the sky."
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing key 'good' \(set by model\.data\.chosen_key\)"):
        _dataset(tmp_path, tok, [{"instruction": "x", "chosen": "a", "rejected": "b"}],
                 keys=PreferenceColumns(chosen="good"))


def test_boundary_is_exact_where_the_tokenizer_would_merge(tmp_path, tok):
    # "blue" is one token when encoded whole; split at the boundary it must stay "bl" + "ue."
    prompt, response = "The sky is bl", "ue."
    assert tok.encode(prompt + response) != tok.encode(prompt) + tok.encode(response)
    ds = _dataset(tmp_path, tok, [{"prompt": prompt, "chosen": response, "rejected": "ack."}], add_eos=False)
    pair = ds.pairs[0]
    assert pair.prompt.tolist() == tok.encode(prompt) and pair.chosen.tolist() == tok.encode(response)
    batch = collate_pairs(ds, [0], tok.pad_id, packed=False)
    scored = batch.labels[0][batch.labels[0] != IGNORE_INDEX]
    assert scored.tolist() == tok.encode(response)  # exactly the response tokens are labelled


def test_padded_and_packed_layouts_label_the_same_tokens(tmp_path, tok):
    rows = [{"prompt": f"Q{i}: what color?", "chosen": " blue" * (i + 1), "rejected": " red"} for i in range(3)]
    ds = _dataset(tmp_path, tok, rows)
    padded, packed = collate_pairs(ds, [0, 1, 2], tok.pad_id, False), collate_pairs(ds, [[0, 1], [2]], tok.pad_id, True)
    for s in range(6):
        a = padded.labels[padded.seq_index == s]
        b = packed.labels[packed.seq_index == s]
        assert a.tolist() == b.tolist() and len(a) > 0
    assert packed.segment_ids[0].unique().tolist() == [0, 1, 2, 3]  # two pairs = four sequences
    pad = packed.input_ids.shape[1] - int((packed.segment_ids[1] < 2).sum())  # the shorter row: one pair, then
    assert packed.segment_ids[1, -pad:].tolist() == list(range(2, 2 + pad))  # padding, one segment per token
    assert padded.num_real_tokens == packed.num_real_tokens


def test_overlength_truncate_keeps_responses_and_counts(tmp_path, tok):
    long_prompt = "What color is the banana? " * 20
    ds = _dataset(tmp_path, tok, [{"prompt": long_prompt, "chosen": " Yellow.", "rejected": " Blue."},
                                  {"prompt": "Short?", "chosen": " Yes.", "rejected": " No."}], seq_length=16)
    assert ds.report.num_truncated == 1 and ds.report.truncated_sources == [f"{tmp_path / 'd.jsonl'}:1"]
    pair = ds.pairs[0]
    assert len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) == 16
    assert tok.decode(pair.chosen) == " Yellow.<|im_end|>"  # response kept whole
    assert tok.decode(pair.prompt) in long_prompt  # prompt cut from the left
    assert long_prompt.endswith(tok.decode(pair.prompt))


def test_overlength_drop_and_error(tmp_path, tok):
    rows = [{"prompt": "x " * 100, "chosen": " a", "rejected": " b"}, {"prompt": "y", "chosen": " a", "rejected": " b"}]
    ds = _dataset(tmp_path, tok, rows, seq_length=16, overlength="drop")
    assert len(ds) == 1 and ds.report.num_dropped == 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: pair has \d+ tokens .* > seq_length=16"):
        _dataset(tmp_path, tok, rows, seq_length=16, overlength="error")


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "chosen": "b"', r"d\.jsonl:2: malformed JSON"),
    ('{"prompt": "a", "rejected": "b"}', r"d\.jsonl:2: missing chosen: expected one of \['chosen_response', 'chosen'\]"),
    ('{"prompt": "a", "chosen": "  ", "rejected": "b"}', r"d\.jsonl:2: empty chosen response"),
    ('{"prompt": "a", "chosen": "b", "rejected": ""}', r"d\.jsonl:2: empty rejected response"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_reward": "high"}', r"d\.jsonl:2: chosen_reward must be a number"),
    ('{"prompt": 5, "chosen": "b", "rejected": "c"}', r"d\.jsonl:2: prompt must be a string or a non-empty list"),
    ('[1, 2]', r"d\.jsonl:2: expected a JSON object"),
])
def test_bad_rows_name_file_and_line(tmp_path, tok, line, message):
    good = '{"prompt": "a", "chosen": "b", "rejected": "c"}'
    with pytest.raises(DataError, match=message):
        PreferenceDataset.from_files([_write(tmp_path, [good, line])], tok, TokenizeSettings(seq_length=64))


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        PreferenceDataset.from_files([tmp_path / "nope.jsonl"], tok, TokenizeSettings(seq_length=64))


def test_dataset_smaller_than_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"train data has 5 items but model\.global_batch_size=8"):
        GlobalBatchSampler(5, 8, seed=0)


def test_data_order_is_a_function_of_seed_and_epoch():
    a, b = GlobalBatchSampler(100, 10, seed=3), GlobalBatchSampler(100, 10, seed=3)
    assert a.global_batch(2, 4) == b.global_batch(2, 4)
    assert a.global_batch(0, 0) != a.global_batch(1, 0)
    epoch = np.concatenate([a.global_batch(0, k) for k in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))
