"""Tests for nemo_aligner.data.tokenizer and nemo_aligner.data.chat_templates.

Every tokenizer is built here from a few sentences (no downloads): a byte-level
BPE ``tokenizer.json`` via the ``tokenizers`` library and a sentencepiece model
via ``SentencePieceTrainer``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from nemo_aligner.data.chat_templates import BUILTIN_TEMPLATES, get_template, render_with_assistant_spans
from nemo_aligner.data.tokenizer import Tokenizer

CORPUS = [
    "hello world, this is a tiny corpus for testing tokenizers",
    "the quick brown fox jumps over the lazy dog",
    "what is two plus two? it is four.",
    "you are terse and helpful; answer the question",
    "system user assistant turns make a conversation",
]
HF_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
# A ChatML-like template that also uses bos_token, to check what is passed to jinja.
OWN_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
NEMO_DUMMY_DPO = Path(__file__).resolve().parent / "data/nemo_aligner_format/dummy-dpo.jsonl"


def build_hf_folder(folder: Path, config: dict, corpus: list[str] = CORPUS, post_bos: bool = True) -> Path:
    """Train a byte-level BPE tokenizer.json (post-processor adds <s>) and write a tokenizer_config.json."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RawTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=HF_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},  # AddedToken-style dict, as transformers writes it
        "pad_token": "<pad>",
        "chat_template": OWN_TEMPLATE,
    }
    return build_hf_folder(tmp_path_factory.mktemp("hf"), config)


@pytest.fixture(scope="module")
def hf_tok(hf_dir) -> Tokenizer:
    return Tokenizer.from_path(hf_dir)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    import sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=100, model_type="bpe",
        user_defined_symbols=["<extra_id_0>", "<extra_id_1>"], hard_vocab_limit=False, minloglevel=2,
    )
    (folder / "corpus.txt").unlink()
    return folder / "tokenizer.model"


# ----------------------------------------------------------------------------- Hugging Face


def test_hf_encode_decode_round_trip(hf_tok):
    text = "the quick brown fox, what is two plus two?"
    ids = hf_tok.encode(text)
    assert hf_tok.bos_id not in ids
    assert hf_tok.decode(ids) == text


def test_hf_special_ids(hf_tok):
    assert (hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id) == (1, 2, 3)
    assert not hf_tok.pad_id_is_eos
    assert hf_tok.vocab_size == 320
    assert hf_tok.decode([1, 4, 5, 2], skip_special_tokens=True) == ""
    assert hf_tok.decode([4, 5]) == "<|im_start|><|im_end|>"


def test_hf_add_special_tokens_follows_post_processor(hf_dir, hf_tok):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"))
    text = "hello world"
    assert hf_tok.encode(text, add_special_tokens=True) == [1] + hf_tok.encode(text)
    assert hf_tok.encode(text, add_special_tokens=True) == reference.encode(text)
    assert hf_tok.encode(text) == reference.encode(text, add_special_tokens=False)


def test_hf_llama_style_flags_replace_post_processor(tmp_path):
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}
    tok = Tokenizer.from_path(build_hf_folder(tmp_path, config))
    raw = tok.encode("hello")
    assert tok.encode("hello", add_special_tokens=True) == [1] + raw + [2]
    # Only add_eos_token given: bos still follows the post-processor (which adds <s>).
    eos_only = {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": True}
    with_post = Tokenizer.from_path(build_hf_folder(tmp_path / "with_post", eos_only))
    assert with_post.encode("hello", add_special_tokens=True) == [1] + raw + [2]
    no_post = Tokenizer.from_path(build_hf_folder(tmp_path / "no_post", eos_only, post_bos=False))
    assert no_post.encode("hello", add_special_tokens=True) == raw + [2]


def test_hf_chat_template_matches_transformers(hf_dir, hf_tok):
    from transformers import PreTrainedTokenizerFast

    expected = (
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert hf_tok.chat_template == OWN_TEMPLATE
    assert hf_tok.apply_chat_template(CONVERSATION) == expected
    reference = PreTrainedTokenizerFast(
        tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<s>", eos_token="</s>"
    )
    for template in [OWN_TEMPLATE, *BUILTIN_TEMPLATES.values()]:
        for gen in (False, True):
            want = reference.apply_chat_template(
                CONVERSATION[:2], chat_template=template, tokenize=False, add_generation_prompt=gen
            )
            got = hf_tok.apply_chat_template(CONVERSATION[:2], template=template, add_generation_prompt=gen)
            assert got == want


def test_chat_template_list_and_jinja_file(tmp_path):
    listed = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'default' }}"}]
    folder = build_hf_folder(tmp_path, {"eos_token": "</s>", "chat_template": listed})
    assert Tokenizer.from_path(folder).chat_template == "{{ 'default' }}"
    (folder / "chat_template.jinja").write_text("{{ 'from file' }}")
    assert Tokenizer.from_path(folder).apply_chat_template(CONVERSATION) == "from file"


def test_generation_tags_are_accepted(hf_tok):
    template = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    assert hf_tok.apply_chat_template(CONVERSATION, template=template) == "You are terse.What is 2+2?4"


def test_tokenizer_json_file_path_reads_sibling_config(hf_dir):
    tok = Tokenizer.from_path(hf_dir / "tokenizer.json")
    assert (tok.pad_id, tok.chat_template) == (3, OWN_TEMPLATE)


def test_no_pad_token_pads_with_eos(tmp_path, caplog):
    folder = build_hf_folder(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"})
    with caplog.at_level(logging.WARNING, logger="nemo_aligner.data.tokenizer"):
        tok = Tokenizer.from_path(folder)
    assert tok.pad_id == tok.eos_id == 2
    assert tok.pad_id_is_eos
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "no pad token" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------- sentencepiece


def test_sentencepiece_encode_decode_and_special_ids(sp_model):
    tok = Tokenizer.from_path(sp_model)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == 2 and tok.pad_id_is_eos  # trainer default pad_id=-1 means no pad
    text = "hello world, the quick brown fox"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [1] + ids
    assert tok.decode([1] + ids + [2]) == "<s>" + text + "</s>"
    assert tok.decode([1] + ids + [2], skip_special_tokens=True) == text
    assert tok.vocab_size == 100


def test_sentencepiece_folder_and_type(sp_model):
    by_folder = Tokenizer.from_path(sp_model.parent, tokenizer_type="sentencepiece")
    by_file = Tokenizer.from_path(sp_model)
    assert by_folder.encode("two plus two") == by_file.encode("two plus two")
    assert by_folder.fingerprint() == by_file.fingerprint()


def test_sentencepiece_renders_builtin_templates(sp_model):
    tok = Tokenizer.from_path(sp_model)
    prompt = tok.apply_chat_template(CONVERSATION[:2], template="extra_id", add_generation_prompt=True)
    assert prompt.startswith("<extra_id_0>System\nYou are terse.\n")
    assert tok.encode(prompt)[0] == tok.encode("<extra_id_0>")[0]  # user-defined symbol stays one piece
    assert tok.apply_chat_template(CONVERSATION, template="plain").endswith("4</s>")


# ----------------------------------------------------------------------------- save / fingerprint


@pytest.mark.parametrize("kind", ["huggingface", "sentencepiece"])
def test_save_round_trip(kind, hf_dir, sp_model, tmp_path):
    original = Tokenizer.from_path(hf_dir if kind == "huggingface" else sp_model)
    if kind == "sentencepiece":
        original.chat_template = "chatml"
    original.save(tmp_path / "saved")
    loaded = Tokenizer.from_path(tmp_path / "saved", tokenizer_type=kind)
    text = "what is two plus two? hello world"
    assert loaded.encode(text) == original.encode(text)
    assert loaded.encode(text, add_special_tokens=True) == original.encode(text, add_special_tokens=True)
    for attr in ("bos_id", "eos_id", "pad_id", "pad_id_is_eos", "chat_template", "vocab_size"):
        assert getattr(loaded, attr) == getattr(original, attr), attr
    assert loaded.fingerprint() == original.fingerprint()


def test_fingerprint_stable_and_distinct(hf_dir, hf_tok, sp_model, tmp_path):
    assert Tokenizer.from_path(hf_dir).fingerprint() == hf_tok.fingerprint()
    reformatted = tmp_path / "reformatted"
    reformatted.mkdir()
    raw = json.loads((hf_dir / "tokenizer.json").read_text())
    (reformatted / "tokenizer.json").write_text(json.dumps(raw, indent=4))
    (reformatted / "tokenizer_config.json").write_text((hf_dir / "tokenizer_config.json").read_text())
    assert Tokenizer.from_path(reformatted).fingerprint() == hf_tok.fingerprint()

    config = {"eos_token": "</s>", "pad_token": "<pad>", "bos_token": "<s>"}
    other_corpus = ["completely different sentences", "zebra yak xylophone"]
    other_vocab = build_hf_folder(tmp_path / "other", config, corpus=other_corpus)
    other_eos = build_hf_folder(tmp_path / "eos", {**config, "eos_token": "<|im_end|>"})
    prints = {hf_tok.fingerprint(), Tokenizer.from_path(sp_model).fingerprint(),
              Tokenizer.from_path(other_vocab).fingerprint(), Tokenizer.from_path(other_eos).fingerprint()}
    assert len(prints) == 4
    assert all(len(p) == 64 for p in prints)


# ----------------------------------------------------------------------------- built-in templates

EXPECTED_RENDERS = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
    "qwen2_5": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4<|im_end|>\n",
    "extra_id": "<extra_id_0>System\nYou are terse.\n<extra_id_1>User\nWhat is 2+2?\n"
    "<extra_id_1>Assistant\n4\n<extra_id_1>",
    "plain": "You are terse.\nWhat is 2+2?\n4</s>",
}
EXPECTED_GENERATION_PROMPTS = {
    "chatml": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2_5": "<|im_start|>assistant\n",
    "extra_id": "<extra_id_1>Assistant\n",
    "plain": "",
}
END_MARKERS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2_5": "<|im_end|>",
               "extra_id": "\n<extra_id_1>", "plain": "</s>"}


def test_expected_tables_cover_builtins():
    names = set(BUILTIN_TEMPLATES)
    assert set(EXPECTED_RENDERS) == set(EXPECTED_GENERATION_PROMPTS) == set(END_MARKERS) == names


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_renders_exactly(name, hf_tok):
    assert hf_tok.apply_chat_template(CONVERSATION, template=name) == EXPECTED_RENDERS[name]
    prompt = hf_tok.apply_chat_template(CONVERSATION[:2], template=name, add_generation_prompt=True)
    full = EXPECTED_RENDERS[name]
    assert prompt == full[: full.index("4" + END_MARKERS[name])]
    assert prompt.endswith(EXPECTED_GENERATION_PROMPTS[name])


def test_llama3_generation_prompt_exact(hf_tok):
    prompt = hf_tok.apply_chat_template(CONVERSATION[1:2], template="llama3", add_generation_prompt=True)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_qwen2_5_default_system_prompt(hf_tok):
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "Hi"}], template="qwen2_5",
                                          add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_extra_id_reproduces_nemo_aligner_prompt(hf_tok):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "This is a test question?"}]
    prompt = hf_tok.apply_chat_template(messages, template="extra_id", add_generation_prompt=True)
    assert prompt == (
        "<extra_id_0>System\n\n<extra_id_1>User\nThis is a test question?\n<extra_id_1>Assistant\n"
    )
    assert hf_tok.apply_chat_template(messages[1:], template="extra_id", add_generation_prompt=True) == prompt
    answered = messages + [{"role": "assistant", "content": "This is the chosen response."}]
    rendered = hf_tok.apply_chat_template(answered, template="extra_id")
    assert rendered == prompt + "This is the chosen response.\n<extra_id_1>"


def test_extra_id_reproduces_every_dummy_dpo_row(hf_tok):
    for line in NEMO_DUMMY_DPO.read_text().splitlines():
        row = json.loads(line)
        question = row["prompt"].split("<extra_id_1>User\n")[1].split("\n<extra_id_1>Assistant")[0]
        messages = [{"role": "system", "content": ""}, {"role": "user", "content": question}]
        prompt = hf_tok.apply_chat_template(messages, template="extra_id", add_generation_prompt=True)
        assert prompt == row["prompt"]
        answer = {"role": "assistant", "content": row["chosen_response"].removesuffix("\n<extra_id_1>")}
        full = hf_tok.apply_chat_template(messages + [answer], template="extra_id")
        assert full == row["prompt"] + row["chosen_response"]


def test_get_template():
    assert get_template("chatml") is BUILTIN_TEMPLATES["chatml"]
    assert get_template("{{ messages[0]['content'] }}") == "{{ messages[0]['content'] }}"


# ----------------------------------------------------------------------------- assistant spans

MULTI_TURN = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_assistant_spans_cover_content_and_end_marker(name, hf_tok):
    text, spans = render_with_assistant_spans(hf_tok, MULTI_TURN, template=name)
    assert text == hf_tok.apply_chat_template(MULTI_TURN, template=name)
    assert [text[a:b] for a, b in spans] == ["4" + END_MARKERS[name], "It is 6." + END_MARKERS[name]]


def test_assistant_spans_with_tokenizer_template(hf_tok):
    text, spans = render_with_assistant_spans(hf_tok, MULTI_TURN)
    assert text.startswith("<s>")
    assert [text[a:b] for a, b in spans] == ["4<|im_end|>", "It is 6.<|im_end|>"]


def test_assistant_spans_reject_history_rewriting_template(hf_tok):
    # Drops every assistant turn but the last, as reasoning templates do with past thoughts.
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] + '\\n' }}"
        "{% endif %}{% endfor %}"
    )
    with pytest.raises(ValueError, match="given jinja chat template does not render conversations prefix"):
        render_with_assistant_spans(hf_tok, MULTI_TURN, template=template)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    with pytest.raises(ValueError, match=r"tokenizer path .*nowhere does not exist"):
        Tokenizer.from_path(tmp_path / "nowhere")


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"no tokenizer\.json or \*\.model in "):
        Tokenizer.from_path(tmp_path)


def test_tokenizer_type_mismatch(hf_dir, sp_model):
    with pytest.raises(ValueError, match=r"tokenizer_type='sentencepiece' but there is no \*\.model file in"):
        Tokenizer.from_path(hf_dir, tokenizer_type="sentencepiece")
    with pytest.raises(ValueError, match=r"tokenizer_type='huggingface' but there is no tokenizer\.json in"):
        Tokenizer.from_path(sp_model.parent, tokenizer_type="huggingface")
    with pytest.raises(ValueError, match=r"tokenizer_type='huggingface' but .* is a sentencepiece tokenizer"):
        Tokenizer.from_path(sp_model, tokenizer_type="huggingface")
    with pytest.raises(ValueError, match=r"tokenizer_type='hf': expected one of"):
        Tokenizer.from_path(hf_dir, tokenizer_type="hf")


def test_no_chat_template(sp_model):
    with pytest.raises(ValueError, match=r"has no chat template: set model\.data\.chat_template .*chatml"):
        Tokenizer.from_path(sp_model).apply_chat_template(CONVERSATION)


def test_unknown_template_name(hf_tok):
    with pytest.raises(ValueError, match=r"unknown chat template 'vicuna': expected one of"):
        hf_tok.apply_chat_template(CONVERSATION, template="vicuna")


def test_template_raise_exception_becomes_value_error(hf_tok):
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    with pytest.raises(ValueError, match="given jinja chat template failed to render: no system role"):
        hf_tok.apply_chat_template(CONVERSATION, template=template)


def test_non_string_content_is_value_error(hf_tok):
    with pytest.raises(ValueError, match="chat template 'chatml' failed to render"):
        hf_tok.apply_chat_template([{"role": "user", "content": None}], template="chatml")


def test_sandbox_blocks_attribute_escapes(hf_tok):
    with pytest.raises(ValueError, match="failed to render"):
        hf_tok.apply_chat_template(CONVERSATION, template="{{ messages.__class__.__mro__ }}")


def test_special_token_missing_from_vocab(tmp_path):
    folder = build_hf_folder(tmp_path, {"eos_token": "<|endoftext|>"})
    with pytest.raises(ValueError, match=r"eos_token '<\|endoftext\|>' .* is not in its vocabulary"):
        Tokenizer.from_path(folder)


def test_neither_pad_nor_eos(tmp_path):
    with pytest.raises(ValueError, match="has neither a pad nor an eos token"):
        Tokenizer.from_path(build_hf_folder(tmp_path, {"bos_token": "<s>"}))
