"""`--help` text from the schema: every key with its default and the comment the schema gives it."""

import dataclasses

from nemo_aligner.config import DPORunConfig, SFTRunConfig
from nemo_aligner.config.describe import describe, field_comments, help_text


def _leaf_keys(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaf_keys(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_describe_lists_every_leaf_key_with_its_default():
    for schema in (DPORunConfig, SFTRunConfig):
        keys = {k.name: k for k in describe(schema)}
        assert set(keys) == set(_leaf_keys(schema()))
    keys = {k.name: k for k in describe(DPORunConfig)}
    assert keys["model.dpo.ref_policy_kl_penalty"].default == 0.2
    assert keys["model.peft.lora_tuning.target_modules"].default == ["attention_qkv"]
    assert keys["model.dpo.ref_policy_kl_penalty"].doc.startswith("beta: the KL coefficient")


def test_comments_on_the_line_or_above_become_the_doc():
    from nemo_aligner.config.sft import SFTConfig

    docs = field_comments(SFTConfig)
    assert docs["loss_normalization"].startswith("tokens: mean NLL over the global batch's response tokens")
    assert docs["logprob_chunk_size"] == "tokens per chunk of the output projection (memory vs speed)"
    keys = {k.name: k for k in describe(SFTRunConfig)}
    assert keys["model.data.seq_length"].doc.startswith("max tokens per sequence")  # inherited from DataConfig
    assert keys["model.data.loss_on"].doc.startswith("all_assistant | last_assistant")


def test_help_text_groups_keys_by_section():
    text = help_text(DPORunConfig, "nemo-aligner dpo")
    assert text.startswith("usage: nemo-aligner dpo")
    assert "\n[model.dpo]\n  model.dpo.ref_policy_kl_penalty = 0.2\n      beta" in text
    sections = [line for line in text.splitlines() if line.startswith("[")]
    assert len(sections) == len(set(sections)) and sections[0] == "[run]" and sections[1] == "[trainer]"


def test_every_key_of_every_command_has_a_one_line_description():
    """`nemo-aligner <command> --help` describes every key it lists (a new key needs its comment)."""
    from nemo_aligner.cli import COMMANDS, _load

    for name, command in COMMANDS.items():
        undocumented = [key.name for key in describe(_load(command.schema)) if not key.doc]
        assert not undocumented, (name, undocumented)
