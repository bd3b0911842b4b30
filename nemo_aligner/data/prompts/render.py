"""A prompt into token ids exactly as training renders it: a string verbatim, a list of messages through the
chat template with the generation prompt (`Tokenizer.apply_chat_template(add_generation_prompt=True)`),
then BOS as `model.data.add_bos` decides (`data.dataset.with_bos`) -- the two calls the DPO data path makes
for its prompts. Used by generation (`generation.prompts` re-exports these) and by the prompt datasets of
online RL (`data.prompts`)."""

import json

from nemo_aligner.data.dataset import with_bos
from nemo_aligner.data.rows import DataError


def render_prompt(prompt, tokenizer, chat_template: str | None = None, where: str = "prompt") -> str:
    """The text of a prompt: a string as it is, a message list through the chat template + generation prompt."""
    if isinstance(prompt, str):
        return prompt
    is_message = lambda m: isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("role", "content"))  # noqa: E731
    if not isinstance(prompt, list) or not prompt or not all(is_message(m) for m in prompt):
        raise DataError(f"{where}: expected a string or a non-empty list of {{role, content}} messages, "
                        f"got {json.dumps(prompt)[:120]}")
    try:
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, template=chat_template)
    except ValueError as err:
        raise DataError(f"{where}: {err}") from None


def prompt_token_ids(prompt, tokenizer, chat_template: str | None = None, add_bos: bool | None = None,
                     where: str = "prompt") -> list[int]:
    """Token ids of one prompt (see the module docstring)."""
    ids, _ = with_bos(tokenizer.encode(render_prompt(prompt, tokenizer, chat_template, where)), tokenizer, add_bos)
    if not ids:
        raise DataError(f"{where}: the prompt has no tokens")
    return ids
