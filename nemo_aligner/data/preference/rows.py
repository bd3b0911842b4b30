"""Preference rows of every accepted shape normalised into PreferenceExample.

Accepted row shapes (see README "Data formats"):
- NeMo-Aligner legacy: prompt (str, already templated), chosen_response / rejected_response (str)
- NeMo-Aligner chat:   prompt (list of {role, content}), chosen_response / rejected_response ({role, content})
- TRL standard:        prompt, chosen, rejected (str)
- TRL conversational:  prompt (messages), chosen / rejected (lists of assistant messages); or no prompt
                       at all, with chosen/rejected full conversations sharing the prompt turns
- ROLL:                instruction (+ optional input appended), chosen, rejected; keys set by
                       model.data.prompt_key / chosen_key / rejected_key
Optional chosen_reward / rejected_reward on any shape.
"""

from dataclasses import dataclass

from nemo_aligner.data.messages import check_messages
from nemo_aligner.data.rows import DataError, read_rows

PROMPT_KEYS = ("prompt", "instruction")
CHOSEN_KEYS = ("chosen_response", "chosen")
REJECTED_KEYS = ("rejected_response", "rejected")


@dataclass
class PreferenceExample:
    prompt: str | list  # a templated string (used verbatim) or a list of messages (chat-templated)
    chosen: str | list  # a string (verbatim) or a list of assistant messages
    rejected: str | list
    chosen_reward: float | None = None
    rejected_reward: float | None = None
    margin: float | None = None  # reward models: subtracted from r_chosen - r_rejected (model.data.margin_key)
    shape: str = ""  # which row shape it came from (for the start-up report)
    source: str = ""  # "file:line", for error messages and reports


@dataclass
class PreferenceColumns:
    """Column names (model.data.prompt_key / chosen_key / rejected_key / input_key); None = detect."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    input: str = "input"


def _pick(row, explicit, candidates, what, where):
    if explicit is not None:
        if explicit not in row:
            raise DataError(f"{where}: missing key {explicit!r} (set by model.data.{what}_key); row has {sorted(row)}")
        return row[explicit]
    for key in candidates:
        if key in row:
            return row[key]
    raise DataError(f"{where}: missing {what}: expected one of {list(candidates)}; row has {sorted(row)}")


def preference_from_row(row: dict, where: str, columns: PreferenceColumns = PreferenceColumns()) -> PreferenceExample:
    chosen = _pick(row, columns.chosen, CHOSEN_KEYS, "chosen", where)
    rejected = _pick(row, columns.rejected, REJECTED_KEYS, "rejected", where)
    has_prompt = columns.prompt in row if columns.prompt else any(k in row for k in PROMPT_KEYS)
    if has_prompt or columns.prompt:
        prompt = _pick(row, columns.prompt, PROMPT_KEYS, "prompt", where)
    else:  # TRL implicit prompt: the shared leading turns of two full conversations
        prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where)
    prompt = _with_input(prompt, row.get(columns.input), where)
    return PreferenceExample(
        prompt=_check_prompt(prompt, where),
        chosen=_check_response(chosen, "chosen", where),
        rejected=_check_response(rejected, "rejected", where),
        chosen_reward=_reward(row, "chosen_reward", where),
        rejected_reward=_reward(row, "rejected_reward", where),
        shape=_shape(row, prompt, has_prompt or bool(columns.prompt)),
        source=where,
    )


def _shape(row: dict, prompt, explicit_prompt: bool) -> str:
    if not explicit_prompt:
        return "trl_implicit_prompt"
    if "chosen_response" in row:
        return "nemo_legacy" if isinstance(prompt, str) else "nemo_chat"
    if "instruction" in row and "prompt" not in row:
        return "roll"
    return "trl" if isinstance(prompt, str) else "trl_conversational"


def _with_input(prompt, extra, where):
    # ROLL rows carry an optional `input` appended to the instruction.
    if extra in (None, ""):
        return prompt
    if not isinstance(extra, str):
        raise DataError(f"{where}: 'input' must be a string, got {type(extra).__name__}")
    if isinstance(prompt, str):
        return f"{prompt}\n{extra}" if prompt else extra
    if prompt and prompt[-1].get("role") == "user":
        return prompt[:-1] + [{**prompt[-1], "content": f"{prompt[-1]['content']}\n{extra}"}]
    raise DataError(f"{where}: 'input' given but the prompt does not end with a user message")


def _split_implicit_prompt(chosen, rejected, where):
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(f"{where}: missing prompt: expected one of {list(PROMPT_KEYS)} (or chosen/rejected "
                        "as full conversations sharing their prompt turns)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(f"{where}: chosen and rejected conversations share no prompt turns")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _check_messages(messages, what, where):
    messages[:] = check_messages(messages, what, where)


def _check_prompt(prompt, where):
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        _check_messages(prompt, "prompt", where)
        return prompt
    raise DataError(f"{where}: prompt must be a string or a non-empty list of messages, got {type(prompt).__name__}")


def _check_response(response, what, where):
    if isinstance(response, dict):  # NeMo-Aligner chat: one {role, content} message
        response = [response]
    if isinstance(response, list):
        _check_messages(response, what, where)
        if not response or not any(m["content"].strip() for m in response):
            raise DataError(f"{where}: empty {what} response")
        return response
    if not isinstance(response, str):
        raise DataError(f"{where}: {what} must be a string or messages, got {type(response).__name__}")
    if not response.strip():
        raise DataError(f"{where}: empty {what} response")
    return response


def _reward(row, key, where):
    value = row.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: {key} must be a number, got {value!r}")
    return float(value)


def read_preference_file(path, columns: PreferenceColumns = PreferenceColumns()) -> list[PreferenceExample]:
    return [preference_from_row(row, where, columns) for where, row in read_rows(path)]
