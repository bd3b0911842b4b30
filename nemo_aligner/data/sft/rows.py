"""SFT rows of every accepted shape normalised into SFTExample (tokenisation: data.sft.tokenize).

Row shapes, detected per row in this order (`model.data.row_format` forces one instead):
1. NeMo chat      `conversations` present: {"system", "mask", "conversations": [{"from", "value"}]};
                  `from` User/Assistant (any case) map to user/assistant; `mask` names the role whose
                  turns are masked (only "User" is meaningful: assistant turns are what SFT trains on).
2. messages       `messages` present (TRL conversational): [{"role", "content"}, ...].
3. prompt/completion  `completion` present (TRL): both strings (base-model style: the prompt verbatim,
                  labels on the completion + EOS), or prompt messages and completion messages / string
                  (only the completion's assistant turns are trained; the prompt's are context).
4. ROLL           `model.data.response_key` (default `output`) present: system from `system_key`, user
                  turn from `prompt_key` (default `instruction`) with `query_key` (default `input`)
                  appended after a newline, assistant turn from `response_key`. A row with no prompt
                  key but a query (NeMo's {"input", "output"} rows) uses the query as the user turn.

Tokenisation (chat template, exact label mask, over-length policy): data.sft.tokenize.
"""

from dataclasses import dataclass

from nemo_aligner.data.messages import check_messages
from nemo_aligner.data.rows import DataError, read_rows

NEMO_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class SFTColumns:
    """ROLL column names and the row-shape override (model.data.*)."""

    row_format: str = "auto"
    system_key: str | None = "system"
    prompt_key: str = "instruction"
    query_key: str | None = "input"
    response_key: str = "output"


@dataclass
class SFTExample:
    """Either messages (chat-templated) or a verbatim prompt + completion string."""

    messages: list | None = None  # [{"role", "content"}]; None for text examples
    trainable: list | None = None  # per message: may this assistant turn carry labels
    prompt: str | None = None  # text examples: used verbatim
    completion: str | None = None
    shape: str = ""  # which row shape it came from (for the start-up report)
    source: str = ""  # "file:line"


def _check_messages(messages, what: str, where: str) -> list:
    return check_messages(messages, what, where, allow_empty_assistant=False)


def _chat(messages, trainable, shape, where) -> SFTExample:
    if not any(trainable):
        raise DataError(f"{where}: the conversation has no assistant turn to train on")
    return SFTExample(messages=messages, trainable=trainable, shape=shape, source=where)


def _nemo_chat(row, where) -> SFTExample:
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    masked = {r.strip().lower() for r in str(row.get("mask", "User")).split(",") if r.strip()}
    if masked != {"user"}:
        raise DataError(f"{where}: mask={row.get('mask')!r}; only 'User' is supported (user turns masked, "
                        "assistant turns trained)")
    system = row.get("system") or ""
    if not isinstance(system, str):
        raise DataError(f"{where}: 'system' must be a string")
    messages = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{k}] must be an object with 'from' and 'value'")
        role = NEMO_ROLES.get(str(turn["from"]).strip().lower())
        if role is None:
            raise DataError(f"{where}: conversations[{k}] has unknown role from={turn['from']!r}; "
                            "expected User or Assistant")
        messages.append({"role": role, "content": turn["value"]})
    messages = _check_messages(messages, "conversations", where)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return _chat(messages, [m["role"] == "assistant" for m in messages], "nemo_chat", where)


def _messages(row, where) -> SFTExample:
    messages = _check_messages(row["messages"], "messages", where)
    return _chat(messages, [m["role"] == "assistant" for m in messages], "messages", where)


def _prompt_completion(row, where) -> SFTExample:
    if "prompt" not in row:
        raise DataError(f"{where}: row has 'completion' but no 'prompt'")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise DataError(f"{where}: prompt is a string but completion is not; give both as strings or the "
                            "prompt as messages")
        if not completion.strip():
            raise DataError(f"{where}: empty completion")
        return SFTExample(prompt=prompt, completion=completion, shape="prompt_completion", source=where)
    prompt = _check_messages(prompt, "prompt", where)
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    completion = _check_messages(completion, "completion", where)
    trainable = [False] * len(prompt) + [m["role"] == "assistant" for m in completion]
    return _chat(prompt + completion, trainable, "prompt_completion", where)


def _roll(row, where, columns: SFTColumns) -> SFTExample:
    def text(key, required):
        value = row.get(key) if key else None
        if value is None and required:
            raise DataError(f"{where}: missing key {key!r} (model.data.{required}); row has {sorted(row)}")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return value or ""

    response = text(columns.response_key, "response_key")
    if not response.strip():
        raise DataError(f"{where}: empty response in {columns.response_key!r}")
    query = text(columns.query_key, None)
    prompt = text(columns.prompt_key, None if query else "prompt_key")
    user = f"{prompt}\n{query}" if prompt and query else prompt or query
    system = text(columns.system_key, None)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": response}]
    messages = _check_messages(messages, "row", where)
    return _chat(messages, [False] * (len(messages) - 1) + [True], "roll", where)


SHAPES = {"nemo_chat": _nemo_chat, "messages": _messages, "prompt_completion": _prompt_completion}


def detect_shape(row: dict, columns: SFTColumns) -> str | None:
    if columns.row_format != "auto":
        return columns.row_format
    for shape, key in (("nemo_chat", "conversations"), ("messages", "messages"),
                       ("prompt_completion", "completion"), ("roll", columns.response_key)):
        if key in row:
            return shape
    return None


def sft_example_from_row(row: dict, where: str, columns: SFTColumns = SFTColumns()) -> SFTExample:
    shape = detect_shape(row, columns)
    if shape is None:
        raise DataError(f"{where}: unrecognised SFT row with keys {sorted(row)}; expected 'conversations' (NeMo), "
                        f"'messages', 'prompt' + 'completion' (TRL) or {columns.response_key!r} (ROLL, "
                        "model.data.response_key)")
    if shape == "roll":
        return _roll(row, where, columns)
    required = {"nemo_chat": "conversations", "messages": "messages", "prompt_completion": "completion"}[shape]
    if required not in row:
        raise DataError(f"{where}: model.data.row_format={shape} but the row has no {required!r}; "
                        f"row has {sorted(row)}")
    return SHAPES[shape](row, where)


def read_sft_file(path, columns: SFTColumns = SFTColumns()) -> list[SFTExample]:
    return [sft_example_from_row(row, where, columns) for where, row in read_rows(path)]
