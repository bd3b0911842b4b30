"""PromptDataset: every prompt row of the given files read and tokenised up front, every row counted.

A row holds `prompt_key` (default `prompt`): a string used verbatim, or a list of {role, content}
messages rendered through the chat template with the generation prompt (`generation.prompts`, the same
calls the generation and DPO prompt paths make). Every other column is kept, unchanged, for the reward
functions (`answer`, `solution`, ...). Prompts longer than `max_prompt_length` tokens follow
`model.data.overlength`: truncate (keep the last tokens, as TRL cuts prompts from the left), drop, or
error; truncated and dropped rows are counted and named in the RowReport as DPO's are.

An example's `num_tokens` is its prompt; the longest row it can become is that plus the completion
(`padded_row_length`), which is what a run's fixed shapes are sized by.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nemo_aligner.data.dataset import TokenizedDataset, fingerprint_files
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.prompts.render import prompt_token_ids


@dataclass
class PromptSettings:
    """What turns a prompt row into token ids (model.data.*, model.grpo.max_prompt_length)."""

    max_prompt_length: int = 512
    max_completion_length: int = 512  # rows are sized for it (padded_row_length)
    prompt_key: str = "prompt"
    overlength: str = "truncate"  # truncate (keep the last max_prompt_length tokens) | drop | error
    chat_template: str | None = None
    add_bos: bool | None = None

    def key(self) -> dict:
        return {k: getattr(self, k) for k in ("max_prompt_length", "prompt_key", "overlength", "chat_template",
                                              "add_bos")}


@dataclass
class PromptExample:
    ids: np.ndarray  # prompt token ids [L]
    prompt: Any  # the row's prompt (string or messages), as reward functions get it
    columns: dict = field(default_factory=dict)  # every other column of the row
    source: str = ""  # file:line
    truncated: bool = False
    shape: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    num_labels = 0  # nothing of a prompt is scored

    @property
    def prompt_ids(self) -> np.ndarray:
        """The prompt's token ids (what generation continues; `generation.validation` reads it)."""
        return self.ids


def prompt_settings(model_cfg, max_prompt_length: int, max_completion_length: int) -> PromptSettings:
    data = model_cfg.data
    return PromptSettings(max_prompt_length=max_prompt_length, max_completion_length=max_completion_length,
                          prompt_key=data.prompt_key, overlength=data.overlength, chat_template=data.chat_template,
                          add_bos=data.add_bos)


def parse_prompt_row(row: dict, where: str, settings: PromptSettings) -> PromptExample:
    key = settings.prompt_key
    if key not in row:
        raise DataError(f"{where}: missing key {key!r} (model.data.prompt_key); the row has {sorted(row)}")
    prompt = row[key]
    columns = {k: v for k, v in row.items() if k != key}
    shape = "messages" if isinstance(prompt, list) else "string"
    return PromptExample(np.zeros(0, dtype=np.int64), prompt, columns, where, shape=shape)


def tokenize_prompt(example: PromptExample, tokenizer, settings: PromptSettings) -> PromptExample | None:
    """The example with its ids; None when over-length and overlength=drop."""
    ids = prompt_token_ids(example.prompt, tokenizer, settings.chat_template, settings.add_bos, where=example.source)
    limit = settings.max_prompt_length
    if len(ids) > limit:
        if settings.overlength == "error":
            raise DataError(f"{example.source}: the prompt has {len(ids)} tokens, more than "
                            f"model.grpo.max_prompt_length={limit} (model.data.overlength=error; truncate keeps the "
                            "last tokens, drop leaves the row out)")
        if settings.overlength == "drop":
            return None
        ids, example.truncated = ids[-limit:], True
    example.ids = np.asarray(ids, dtype=np.int64)
    return example


class PromptDataset(TokenizedDataset):
    unit = "prompts"
    pack_hint = "prompts are not packed"

    def __init__(self, examples, report, fingerprint="", max_completion_length: int = 0):
        super().__init__(examples, report, fingerprint)
        self.max_completion_length = max_completion_length

    @classmethod
    def from_files(cls, files, tokenizer, settings: PromptSettings, name: str = "data") -> "PromptDataset":
        examples, report, source_rows = cls.read(files, lambda row, where: parse_prompt_row(row, where, settings),
                                                 lambda example: tokenize_prompt(example, tokenizer, settings), name)
        dataset = cls(examples, report, fingerprint_files(report.files, tokenizer.fingerprint(), settings.key()),
                      settings.max_completion_length)
        dataset.source_rows = source_rows
        return dataset

    def padded_row_length(self, index: int) -> int:
        """The longest row a prompt becomes: its tokens and a completion of max_completion_length."""
        return self.examples[index].num_tokens + self.max_completion_length
