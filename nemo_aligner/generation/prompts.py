"""Prompts into token ids exactly as training renders them, and the end-of-sequence ids of a checkpoint.

A string prompt is used verbatim; a list of messages goes through the chat template with the generation
prompt (`Tokenizer.apply_chat_template(add_generation_prompt=True)`), then BOS is prepended as
`model.data.add_bos` decides (`data.dataset.with_bos`): the same two calls the DPO data path
(`data.preference.tokenize`) makes for its prompts, so a model sees at generation what it saw in training
(tests/test_generation.py checks DPO's and SFT's prompt tokens).

EOS ids: the tokenizer's EOS plus generation_config.json's `eos_token_id` (an int or a list), as
transformers' `generate` stops on.
"""

import json
from pathlib import Path

from nemo_aligner.data.prompts.render import prompt_token_ids, render_prompt  # noqa: F401 (re-exported)
from nemo_aligner.data.rows import DataError, read_rows


def read_prompt_rows(path, prompt_key: str = "prompt") -> list[tuple[str, dict]]:
    """[(file:line, row)] of a prompts file; a row without `prompt_key` stops here, naming file and line."""
    rows = []
    for line_no, row in read_rows(path):
        where = f"{path}:{line_no}"
        if prompt_key not in row:
            raise DataError(f"{where}: missing key {prompt_key!r} (generation.prompt_key); row has {sorted(row)}")
        rows.append((where, row))
    if not rows:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return rows


def eos_token_ids(tokenizer, checkpoint_dir=None) -> tuple[int, ...]:
    """The tokenizer's EOS id and those of `<checkpoint_dir>/generation_config.json`, in that order."""
    ids = [tokenizer.eos_id] if tokenizer is not None and tokenizer.eos_id is not None else []
    file = Path(checkpoint_dir) / "generation_config.json" if checkpoint_dir is not None else None
    if file is not None and file.is_file():
        try:
            value = json.loads(file.read_text()).get("eos_token_id")
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None
        for token in value if isinstance(value, list) else [value] if value is not None else []:
            if not isinstance(token, int):
                raise ValueError(f"{file}: eos_token_id={value!r}; expected an int or a list of ints")
            ids.append(token)
    return tuple(dict.fromkeys(ids))
