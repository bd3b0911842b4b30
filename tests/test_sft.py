"""SFT: exact label masks per chat template, every row shape, bad rows by file:line, over-length,
loss normalisation, packed == padded, and run_sft end to end (learning, resume, then DPO on top)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nemo_aligner.algorithms.sft import SFTAlgorithm, SFTSettings
from nemo_aligner.config import ConfigError, DPORunConfig, SFTRunConfig
from nemo_aligner.data.batch import IGNORE_INDEX
from nemo_aligner.data.chat_templates import BUILTIN_TEMPLATES
from nemo_aligner.data.layout import pack_examples
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.sft.dataset import SFTDataset
from nemo_aligner.data.sft.rows import SFTColumns, read_sft_file, sft_example_from_row
from nemo_aligner.data.sft.tokenize import SFTTokenizeSettings, tokenize_sft
from nemo_aligner.data.tokenizer import Tokenizer
from nemo_aligner.losses.logprobs import token_logprobs, token_logprobs_and_correct
from nemo_aligner.losses.sft import num_units, sft_loss
from nemo_aligner.models.gpt import GPTConfig, GPTModel
from nemo_aligner.recipes.dpo import run_dpo
from nemo_aligner.recipes.sft import run_sft
from tests.helpers import compose, micro_batch_loss

ROOT = Path(__file__).resolve().parents[1]
SFT_YAML = ROOT / "nemo_aligner/conf/gpt_sft.yaml"
DPO_YAML = ROOT / "nemo_aligner/conf/gpt_dpo.yaml"
NEMO_SFT = ROOT / "tests/data/nemo_aligner_format/dummy-sft.jsonl"
DEMO = ROOT / "nemo_aligner/demo/data"
FAST = ["model.hidden_size=32", "model.ffn_hidden_size=64", "model.num_layers=1", "model.num_attention_heads=2",
        "model.num_query_groups=1", "model.micro_batch_size=8", "model.global_batch_size=16",
        "exp_manager.progress_bar=false", f"model.data.data_prefix.train=[{DEMO / 'sft_train.jsonl'}]",
        f"model.data.data_prefix.validation=[{DEMO / 'sft_val.jsonl'}]"]

CONV = [{"role": "system", "content": "You answer questions about colors."},
        {"role": "user", "content": "What color is the sky?"},
        {"role": "assistant", "content": "The sky is blue."},
        {"role": "user", "content": "And the grass?"},
        {"role": "assistant", "content": "Green, mostly. "}]
# What each template writes around an assistant's content: content (+ end marker) is what gets labels.
LABELLED = {None: "{}<|im_end|>", "chatml": "{}<|im_end|>", "qwen2_5": "{}<|im_end|>", "llama3": "{}<|eot_id|>",
            "extra_id": "{}\n<extra_id_1>", "plain": "{}<|im_end|>"}  # plain: the demo tokenizer's eos


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and threads thrash when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_path(ROOT / "nemo_aligner/demo/tokenizer")


def _settings(**kw):
    return SFTTokenizeSettings(**{"seq_length": 4096, "add_bos": False, **kw})


def _tokenize(tok, row, keys=SFTColumns(), **kw):
    return tokenize_sft(sft_example_from_row(row, "t.jsonl:1", keys), tok, _settings(**kw))


def _runs(tok, t) -> list[str]:
    """Decoded text of each contiguous run of labelled tokens."""
    runs, current = [], []
    for token, labelled in zip(t.ids.tolist(), t.label_mask.tolist()):
        if labelled:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    return [tok.decode(r) for r in runs + ([current] if current else [])]


def _write(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _config(log_dir, *overrides, yaml=SFT_YAML, schema=SFTRunConfig):
    return compose(yaml, schema, log_dir, *overrides)


def _metrics(log_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(log_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------- label masks
@pytest.mark.parametrize("template", [None, *sorted(BUILTIN_TEMPLATES)])
@pytest.mark.parametrize("loss_on", ["all_assistant", "last_assistant"])
def test_labels_are_exactly_the_assistant_turns_and_end_markers(tok, template, loss_on):
    t = _tokenize(tok, {"messages": CONV}, chat_template=template, loss_on=loss_on)
    contents = [m["content"] for m in CONV if m["role"] == "assistant"]
    contents = [c.strip() for c in contents] if template == "llama3" else contents  # llama3 trims contents
    expected = [LABELLED[template].format(c) for c in contents]
    assert _runs(tok, t) == (expected if loss_on == "all_assistant" else expected[-1:])
    # the ids are the rendered conversation, cut right after the last label
    text = tok.apply_chat_template(CONV, template=template)
    decoded = tok.decode(t.ids)
    assert text.startswith(decoded) and decoded.endswith(expected[-1])


def test_segmented_tokenisation_keeps_the_boundary_where_the_tokenizer_would_merge(tok):
    text = "What color is the sky? It is blue."
    cut = next(i for i in range(len(text) - 2, 0, -1)  # the last split the tokenizer would merge across
               if tok.encode(text) != tok.encode(text[:i]) + tok.encode(text[i:]))
    prompt, completion = text[:cut], text[cut:]
    t = _tokenize(tok, {"prompt": prompt, "completion": completion})
    assert _runs(tok, t) == [completion + "<|im_end|>"]  # string completion: labels + eos
    assert tok.decode(t.ids[~t.label_mask]) == prompt  # the prompt verbatim, no template


def test_bos_is_prepended_once_and_never_labelled(tok):
    t = _tokenize(tok, {"messages": CONV}, add_bos=None)  # default: the tokenizer has <s>
    assert t.ids[0] == tok.bos_id and not t.label_mask[0]
    assert (t.ids == tok.bos_id).sum() == 1


# -------------------------------------------------------------------------------- row shapes
def test_roll_rows_with_system_and_query_keys(tok):
    ex = sft_example_from_row({"system": "Be brief.", "instruction": "Name the color", "input": "of the sky",
                               "output": "Blue."}, "r:1")
    assert ex.shape == "roll"
    assert ex.messages == [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Name the color\nof the sky"},
                           {"role": "assistant", "content": "Blue."}]
    keys = SFTColumns(system_key="sys", prompt_key="q", query_key="ctx", response_key="a")
    ex = sft_example_from_row({"q": "Name the color of the sky", "ctx": "", "a": "Blue."}, "r:2", keys)
    assert [m["role"] for m in ex.messages] == ["user", "assistant"]
    assert ex.messages[0]["content"] == "Name the color of the sky"
    # NeMo's plain {"input", "output"} rows: no instruction, the input is the user turn
    ex = sft_example_from_row({"input": "What color is snow?", "output": "White."}, "r:3")
    assert ex.messages[0] == {"role": "user", "content": "What color is snow?"}
    t = _tokenize(tok, {"system": "Be brief.", "instruction": "Sky?", "input": "Color", "output": "Blue."})
    assert _runs(tok, t) == ["Blue.<|im_end|>"]


def test_nemo_chat_rows_from_dummy_sft(tok):
    examples = read_sft_file(NEMO_SFT)
    rows = [json.loads(line) for line in NEMO_SFT.read_text().splitlines() if line.strip()]
    assert len(examples) == len(rows) == 30  # 29 newline-terminated rows plus a final unterminated one
    for ex, row in zip(examples, rows):
        assert ex.shape == "nemo_chat"
        assert [m["content"] for m in ex.messages] == [c["value"] for c in row["conversations"]]  # system "" dropped
        assert [m["role"] for m in ex.messages] == [c["from"].lower() for c in row["conversations"]]
    short = min(range(30), key=lambda i: sum(len(c["value"]) for c in rows[i]["conversations"]))
    t = _tokenize(tok, rows[short], chat_template="extra_id")
    answers = [c["value"] for c in rows[short]["conversations"] if c["from"] == "Assistant"]
    assert _runs(tok, t) == [a + "\n<extra_id_1>" for a in answers]  # NeMo's response ending
    assert tok.decode(t.ids).startswith("<extra_id_0>System\n\n<extra_id_1>User\n")


def test_nemo_chat_system_and_role_case(tok):
    row = {"system": "Be brief.", "mask": "User", "conversations": [
        {"from": "user", "value": "Sky?"}, {"from": "ASSISTANT", "value": "Blue."},
        {"from": "User", "value": "Grass?"}, {"from": "Assistant", "value": "Green."}]}
    t = _tokenize(tok, row, chat_template="extra_id", loss_on="last_assistant")
    assert _runs(tok, t) == ["Green.\n<extra_id_1>"]
    assert tok.decode(t.ids).startswith("<extra_id_0>System\nBe brief.\n<extra_id_1>User\nSky?\n")


def test_trl_prompt_completion_messages_train_only_the_completion(tok):
    prompt = CONV[:4]  # ends with a user turn; holds an earlier assistant turn, which is context here
    t = _tokenize(tok, {"prompt": prompt, "completion": [{"role": "assistant", "content": "Green."}]})
    assert _runs(tok, t) == ["Green.<|im_end|>"]
    t = _tokenize(tok, {"prompt": prompt, "completion": "Green."})  # string completion after messages
    assert _runs(tok, t) == ["Green.<|im_end|>"]


def test_trl_messages_and_shape_precedence(tok):
    row = {"messages": CONV, "output": "ignored", "completion": "ignored"}
    assert sft_example_from_row(row, "p:1").shape == "messages"
    assert sft_example_from_row({"conversations": [{"from": "User", "value": "a"}, {"from": "Assistant",
                                                                                    "value": "b"}], **row},
                                "p:2").shape == "nemo_chat"
    forced = sft_example_from_row({"prompt": "Q", "completion": "x", "instruction": "Q", "output": "A"}, "p:3",
                                  SFTColumns(row_format="roll"))
    assert forced.shape == "roll" and forced.messages[-1]["content"] == "A"


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}', r"bad\.jsonl:2: malformed JSON"),
    ({"text": "hello"}, r"bad\.jsonl:2: unrecognised SFT row with keys \['text'\]"),
    ({"completion": "x"}, r"bad\.jsonl:2: row has 'completion' but no 'prompt'"),
    ({"input": None, "output": "x"}, r"bad\.jsonl:2: missing key 'instruction' \(model\.data\.prompt_key\)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
     r"bad\.jsonl:2: messages\[1\] is an empty assistant response"),
    ({"prompt": "hi", "completion": ""}, r"bad\.jsonl:2: empty completion"),
    ({"instruction": "hi", "output": ""}, r"bad\.jsonl:2: empty response in 'output'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"bad\.jsonl:2: messages\[0\] has unknown role 'bot'"),
    ({"conversations": [{"from": "Bot", "value": "hi"}]}, r"bad\.jsonl:2: conversations\[0\] has unknown role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:2: the conversation has no assistant turn"),
    ({"conversations": [{"from": "User", "value": "hi"}]}, r"bad\.jsonl:2: the conversation has no assistant turn"),
    ({"mask": "Assistant", "conversations": [{"from": "User", "value": "a"}, {"from": "Assistant", "value": "b"}]},
     r"bad\.jsonl:2: mask='Assistant'; only 'User' is supported"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] must be an object with 'role' and 'content'"),
]


@pytest.mark.parametrize("row,message", BAD)
def test_bad_rows_name_file_and_line(tmp_path, tok, row, message):
    path = _write(tmp_path, [{"messages": CONV}, row], name="bad.jsonl")
    with pytest.raises(DataError, match=message):
        SFTDataset.from_files([path], tok, _settings())


# -------------------------------------------------------------------------------- over-length
def test_overlength_truncate_cuts_leading_context_then_the_end(tmp_path, tok):
    full = _tokenize(tok, {"messages": CONV})
    first_label = int(full.label_mask.argmax())
    path = _write(tmp_path, [{"messages": CONV}])
    # 1) a little too long: only leading context goes, from the left
    limit = len(full) - 5
    ds = SFTDataset.from_files([path], tok, _settings(seq_length=limit))
    cut = ds.examples[0]
    assert len(cut) == limit and ds.report.num_truncated == 1
    assert cut.ids.tolist() == full.ids[5:].tolist() and cut.num_labels == full.num_labels
    # 2) much too long: one context token kept before the first label, then the end is cut
    limit = 6
    cut = SFTDataset.from_files([path], tok, _settings(seq_length=limit)).examples[0]
    assert cut.ids.tolist() == full.ids[first_label - 1:first_label - 1 + limit].tolist()
    assert not cut.label_mask[0] and cut.label_mask[1:].all()


def test_overlength_drop_and_error(tmp_path, tok):
    path = _write(tmp_path, [{"messages": CONV}, {"prompt": "Q", "completion": "A"}])
    ds = SFTDataset.from_files([path], tok, _settings(seq_length=8, overlength="drop"))
    assert len(ds) == 1 and ds.report.num_dropped == 1 and ds.report.dropped_sources == [f"{path}:1"]
    with pytest.raises(DataError, match=rf"{path}:1: example has \d+ tokens > seq_length=8"):
        SFTDataset.from_files([path], tok, _settings(seq_length=8, overlength="error"))


# ----------------------------------------------------------------------------------- losses
def test_loss_normalization_by_hand():
    logps = torch.tensor([-1.0, -2.0, -3.0])  # sequence 0: two tokens, sequence 1: one token
    seq = torch.tensor([0, 0, 1])
    assert num_units(seq, 2, "tokens") == 3 and num_units(seq, 2, "sequences") == 2
    assert sft_loss(logps, seq, 2, "tokens", 3).item() == pytest.approx((1 + 2 + 3) / 3)
    assert sft_loss(logps, seq, 2, "sequences", 2).item() == pytest.approx(((1 + 2) / 2 + 3 / 1) / 2)
    # split over two micro-batches, normalised by the global count: the same total
    for norm, units in (("tokens", 3), ("sequences", 2)):
        parts = sft_loss(logps[:2], seq[:2], 1, norm, units) + sft_loss(logps[2:], seq[2:] - 1, 1, norm, units)
        assert parts.item() == pytest.approx(sft_loss(logps, seq, 2, norm, units).item())


def _tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                              num_query_groups=2, vocab_size=tok.vocab_size, max_position_embeddings=512))


@pytest.fixture(scope="module")
def mixed_dataset(tok, tmp_path_factory):
    """Demo rows plus multi-turn and string rows: several labelled spans per example, varied lengths."""
    rows = [json.loads(line) for line in (DEMO / "sft_train.jsonl").read_text().splitlines()[:9]]
    rows += [{"messages": CONV}, {"prompt": "Sky color: ", "completion": "blue"},
             {"instruction": "Name a red fruit.", "output": "A cherry."}]
    path = _write(tmp_path_factory.mktemp("mixed"), rows)
    return SFTDataset.from_files([path], tok, _settings(seq_length=96, add_bos=None))


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_algorithm_loss_and_accuracy_match_full_logits(tok, mixed_dataset, normalization):
    model = _tiny_model(tok)
    alg = SFTAlgorithm(SFTSettings(normalization, chunk_size=7), tok.pad_id)
    batch = alg.make_batch(mixed_dataset, list(range(len(mixed_dataset))), packed=False)
    loss, sums = micro_batch_loss(alg, model, batch, alg.num_units(batch))
    with torch.no_grad():
        logits = model.logits(batch.input_ids)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none", ignore_index=IGNORE_INDEX)
        scored = batch.labels != IGNORE_INDEX
        per_seq = [nll[batch.seq_index == s] for s in range(batch.num_sequences)]
        expected = nll[scored].mean() if normalization == "tokens" else torch.stack([x.mean() for x in per_seq]).mean()
        acc = (logits.argmax(-1) == batch.labels)[scored].float().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = alg.reduce_metrics(sums, alg.num_units(batch))
    assert metrics["token_acc"] == pytest.approx(acc.item())
    assert metrics["token_nll"] == pytest.approx(nll[scored].mean().item(), rel=1e-5)


def test_chunked_logprobs_with_correct_counts_match_the_plain_path():
    torch.manual_seed(0)
    hidden, weight = torch.randn(23, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    logps, correct = token_logprobs_and_correct(hidden, weight, targets, chunk_size=5)
    (grad_a,) = torch.autograd.grad(logps.sum(), hidden)
    ref = token_logprobs(hidden, weight, targets, chunk_size=23)
    (grad_b,) = torch.autograd.grad(ref.sum(), hidden)
    assert torch.allclose(logps, ref, atol=1e-6) and torch.allclose(grad_a, grad_b, atol=1e-6)
    assert torch.equal(correct, (hidden @ weight.T).argmax(-1) == targets)


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_packed_and_padded_give_the_same_loss_and_gradients(tok, mixed_dataset, normalization):
    def step(items, packed, micro):
        model = _tiny_model(tok)
        alg = SFTAlgorithm(SFTSettings(normalization, chunk_size=16), tok.pad_id)
        batches = [alg.make_batch(mixed_dataset, items[i:i + micro], packed) for i in range(0, len(items), micro)]
        units = sum(alg.num_units(b) for b in batches)
        total, correct = 0.0, 0.0
        for b in batches:
            loss, sums = micro_batch_loss(alg, model, b, units)
            loss.backward()
            total, correct = total + loss.item(), correct + sums["correct"].item()
        return total, correct, {n: p.grad for n, p in model.named_parameters()}

    padded = step(list(range(len(mixed_dataset))), packed=False, micro=4)
    packs = pack_examples(mixed_dataset, 192, "best_fit_decreasing", seed=0)
    assert len(packs) < len(mixed_dataset) and any(len(p) > 1 for p in packs)
    packed = step(packs, packed=True, micro=2)
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert packed[1] == padded[1]
    for name, grad in padded[2].items():
        assert torch.allclose(packed[2][name], grad, atol=1e-6, rtol=1e-4), name


# ------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("sft_run")
    cfg = _config(log_dir, "trainer.sft.max_steps=40", "trainer.sft.val_check_interval=20",
                  "exp_manager.progress_bar=false", "model.micro_batch_size=16")
    return log_dir, run_sft(cfg)


def test_sft_learns_and_writes_every_output(trained):
    log_dir, result = trained
    rows = _metrics(log_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    val = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val] == [20, 40]
    assert val[0]["val/loss"] < result["initial_val"]["loss"] - 2 and val[1]["val/loss"] < val[0]["val/loss"]
    assert val[1]["val/token_acc"] > 0.5
    for key in ("train/loss", "train/token_acc", "train/lr", "train/grad_norm", "train/tokens_per_sec",
                "train/consumed_samples", "val/token_acc", "data/truncated_examples"):
        assert key in rows[-1], key
    for path in ("tensorboard", "checkpoints", "hf/config.json", "hf/tokenizer.json", "curves.png"):
        assert (log_dir / path).exists(), path


def test_dpo_starts_from_the_sft_export(trained, tmp_path):
    log_dir, result = trained
    cfg = _config(tmp_path, f"pretrained_checkpoint.restore_from_path={result['hf_dir']}", "trainer.dpo.max_steps=2",
                  "trainer.dpo.limit_val_batches=1", "exp_manager.progress_bar=false", yaml=DPO_YAML,
                  schema=DPORunConfig)
    out = run_dpo(cfg)
    assert out["steps"] == 2 and out["initial_val"]["loss"] == pytest.approx(0.6931, abs=1e-3)
    # DPO's policy is the SFT model: per token, its NLL of DPO's chosen answers is far below a random model's
    tok = Tokenizer.from_path(result["hf_dir"])
    rows = [json.loads(line) for line in (DEMO / "dpo_val.jsonl").read_text().splitlines()]
    tokens = sum(len(tok.encode(r["chosen_response"]["content"] + "<|im_end|>")) for r in rows) / len(rows)
    assert out["initial_val"]["sft_loss"] / tokens < 0.75 * result["initial_val"]["token_nll"]


def test_packed_run_resumes_on_the_exact_trajectory(tmp_path):
    args = [*FAST, "model.data.packing=true", "model.data.pack_size=256", "model.global_batch_size=4",
            "model.micro_batch_size=2", "model.optim.sched.max_steps=6", "trainer.sft.val_check_interval=3",
            "trainer.sft.limit_val_batches=1", "trainer.sft.save_interval=3", "model.sft.loss_normalization=sequences",
            "exp_manager.create_tensorboard_logger=false"]
    straight = tmp_path / "straight"
    run_sft(_config(straight, *args, "trainer.sft.max_steps=6"))
    resumed = tmp_path / "resumed"
    run_sft(_config(resumed, *args, "trainer.sft.max_steps=3"))
    out = run_sft(_config(resumed, *args, "trainer.sft.max_steps=6"))
    assert out["resumed"]
    drop = ("train/step_time", "train/tokens_per_sec")
    a = [{k: v for k, v in r.items() if k not in drop} for r in _metrics(straight)]
    b = [{k: v for k, v in r.items() if k not in drop} for r in _metrics(resumed)]
    assert a == b and "data/examples_per_pack" in a[0] and a[0]["data/examples_per_pack"] > 1


@pytest.mark.parametrize("override,message", [
    ("model.dpo.ref_policy_kl_penalty=0.1", r"unknown config key 'model\.dpo'"),
    ("model.data.chosen_key=x", r"unknown config key 'model\.data\.chosen_key'; valid keys under 'model\.data'"),
    ("model.sft.loss_normalization=mean", r"model\.sft\.loss_normalization='mean'; expected one of"),
    ("model.data.loss_on=all", r"model\.data\.loss_on='all'"),
    ("model.data.pack_size=10", None),  # valid while packing is off
])
def test_sft_config_errors_name_the_key(tmp_path, override, message):
    if message is None:
        _config(tmp_path, override)
        return
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, override)
    with pytest.raises(ConfigError, match=r"model\.data\.pack_size=10 < seq_length \(96"):
        _config(tmp_path, "model.data.packing=true", "model.data.pack_size=10")


def test_command_line(tmp_path):
    script = ROOT / "examples/nlp/gpt/train_gpt_sft.py"

    def cli(*args):
        return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})

    out = cli(*FAST, "trainer.sft.max_steps=2", "trainer.sft.limit_val_batches=1", "model.data.packing=true",
              "model.encoder_seq_length=96",  # data given: the schema's real defaults apply, not the demo's
              "model.data.chat_template=llama3", f"exp_manager.explicit_log_dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "done: 2 steps" in out.stdout
    saved = json.loads((tmp_path / "run/hf/tokenizer_config.json").read_text())
    assert saved["chat_template"] == BUILTIN_TEMPLATES["llama3"]  # the template SFT trained with
    out = cli("model.data.promptkey=x")
    assert out.returncode != 0 and "model.data.promptkey" in out.stderr
