"""SFT data: read rows of any accepted shape, render them, and tokenise with an exact label mask.

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

Messages go through the chat template (the tokenizer's own, or `model.data.chat_template`); labels
cover each trained assistant turn's content plus its end marker (`render_with_assistant_spans`).
`model.data.loss_on=last_assistant` trains only the last trainable assistant turn. The rendered text
is tokenised in segments split at the assistant-span boundaries, so the label mask is exact even where
the tokenizer would merge characters across a boundary. Tokens after the last label are dropped (under
causal attention they cannot affect the loss).

Over-length (`model.data.overlength`): `error`, `drop`, or `truncate`: first cut the context before
the first label from the left (its end, next to the response, matters most; at least one token is
kept so the first label is scored), then cut the end (the last turns' labels go first).
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nemo_aligner.data.chat_templates import render_with_assistant_spans
from nemo_aligner.data.datasets import affected_rows_text, note_source
from nemo_aligner.data.formats import DataError, read_rows

ROLES = ("system", "user", "assistant")
NEMO_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


@dataclass
class SFTKeys:
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


# ----------------------------------------------------------------------------------------- rows
def _check_messages(messages, what: str, where: str) -> list:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {what} must be a non-empty list of {{role, content}} messages")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {what}[{k}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {what}[{k}] has unknown role {m['role']!r}; expected one of {list(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {what}[{k}].content must be a string, got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: {what}[{k}] is an empty assistant response")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


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


def _roll(row, where, keys: SFTKeys) -> SFTExample:
    def text(key, required):
        value = row.get(key) if key else None
        if value is None and required:
            raise DataError(f"{where}: missing key {key!r} (model.data.{required}); row has {sorted(row)}")
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        return value or ""

    response = text(keys.response_key, "response_key")
    if not response.strip():
        raise DataError(f"{where}: empty response in {keys.response_key!r}")
    query = text(keys.query_key, None)
    prompt = text(keys.prompt_key, None if query else "prompt_key")
    user = f"{prompt}\n{query}" if prompt and query else prompt or query
    system = text(keys.system_key, None)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": response}]
    messages = _check_messages(messages, "row", where)
    return _chat(messages, [False] * (len(messages) - 1) + [True], "roll", where)


SHAPES = {"nemo_chat": _nemo_chat, "messages": _messages, "prompt_completion": _prompt_completion}


def detect_shape(row: dict, keys: SFTKeys) -> str | None:
    if keys.row_format != "auto":
        return keys.row_format
    for shape, key in (("nemo_chat", "conversations"), ("messages", "messages"),
                       ("prompt_completion", "completion"), ("roll", keys.response_key)):
        if key in row:
            return shape
    return None


def sft_example_from_row(row: dict, where: str, keys: SFTKeys = SFTKeys()) -> SFTExample:
    shape = detect_shape(row, keys)
    if shape is None:
        raise DataError(f"{where}: unrecognised SFT row with keys {sorted(row)}; expected 'conversations' (NeMo), "
                        f"'messages', 'prompt' + 'completion' (TRL) or {keys.response_key!r} (ROLL, "
                        "model.data.response_key)")
    if shape == "roll":
        return _roll(row, where, keys)
    required = {"nemo_chat": "conversations", "messages": "messages", "prompt_completion": "completion"}[shape]
    if required not in row:
        raise DataError(f"{where}: model.data.row_format={shape} but the row has no {required!r}; "
                        f"row has {sorted(row)}")
    return SHAPES[shape](row, where)


def read_sft_file(path, keys: SFTKeys = SFTKeys()) -> list[SFTExample]:
    return [sft_example_from_row(row, f"{path}:{line_no}", keys) for line_no, row in read_rows(path)]


# ------------------------------------------------------------------------------------- tokenise
@dataclass
class SFTTokenizeSettings:
    seq_length: int
    overlength: str = "truncate"
    chat_template: str | None = None  # None = the tokenizer's own
    loss_on: str = "all_assistant"
    add_bos: bool | None = None  # None = when the tokenizer has a BOS token
    add_eos: bool = True  # append EOS to string completions


@dataclass
class TokenizedSFT:
    ids: np.ndarray  # int32 [L]
    label_mask: np.ndarray  # bool [L]: token i is a target (predicted from position i - 1)
    truncated: bool = False

    def __len__(self):
        return len(self.ids)

    @property
    def num_labels(self) -> int:
        return int(self.label_mask.sum())


def _segments(example: SFTExample, tokenizer, settings: SFTTokenizeSettings) -> list[tuple[str, bool]]:
    """(text, labelled) pieces of the rendered example, split at every assistant-span boundary."""
    if example.messages is None:
        return [(example.prompt, False), (example.completion, True)]
    try:
        text, spans = render_with_assistant_spans(tokenizer, example.messages, settings.chat_template)
    except ValueError as err:
        raise DataError(f"{example.source}: {err}") from None
    trainable = [t for m, t in zip(example.messages, example.trainable) if m["role"] == "assistant"]
    assert len(trainable) == len(spans)
    if settings.loss_on == "last_assistant":
        last = max(i for i, t in enumerate(trainable) if t)
        trainable = [i == last for i in range(len(trainable))]
    pieces, pos = [], 0
    for (start, end), labelled in zip(spans, trainable):
        pieces += [(text[pos:start], False), (text[start:end], labelled)]
        pos = end
    return pieces + [(text[pos:], False)]


def tokenize_sft(example: SFTExample, tokenizer, settings: SFTTokenizeSettings) -> TokenizedSFT | None:
    """Token ids and label mask for one example; None when the over-length policy drops it."""
    ids, mask = [], []
    for text, labelled in _segments(example, tokenizer, settings):
        piece = tokenizer.encode(text) if text else []
        ids += piece
        mask += [labelled] * len(piece)
    if example.messages is None and settings.add_eos and tokenizer.eos_id is not None and ids[-1] != tokenizer.eos_id:
        ids.append(tokenizer.eos_id)
        mask.append(True)
    add_bos = settings.add_bos if settings.add_bos is not None else tokenizer.bos_id is not None
    if add_bos and tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
        ids, mask = [tokenizer.bos_id] + ids, [False] + mask
    if not any(mask):
        raise DataError(f"{example.source}: the response has no tokens")
    if mask[0]:
        raise DataError(f"{example.source}: the response starts at the first token; it needs at least one "
                        "token before it (a prompt, or BOS with model.data.add_bos=true)")
    last = len(mask) - mask[::-1].index(True)  # tokens after the last label cannot change the loss
    tokenized = TokenizedSFT(np.asarray(ids[:last], np.int32), np.asarray(mask[:last], bool))
    return apply_overlength(tokenized, settings, example.source)


def apply_overlength(example: TokenizedSFT, settings: SFTTokenizeSettings, source: str) -> TokenizedSFT | None:
    limit, length = settings.seq_length, len(example)
    if length <= limit:
        return example
    if settings.overlength == "error":
        raise DataError(f"{source}: example has {length} tokens > seq_length={limit}; shorten it or set "
                        "model.data.overlength=truncate|drop")
    if settings.overlength == "drop":
        return None
    first_label = int(np.argmax(example.label_mask))
    cut_left = min(length - limit, first_label - 1)  # keep one context token before the first label
    mask = example.label_mask[cut_left:cut_left + limit]
    end = cut_left + len(mask) - int(np.argmax(mask[::-1]))  # again drop what follows the last label
    return TokenizedSFT(example.ids[cut_left:end], example.label_mask[cut_left:end], truncated=True)


# -------------------------------------------------------------------------------------- dataset
@dataclass
class SFTReport:
    files: list[str]
    num_rows: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    num_dropped: int = 0
    num_tokens: int = 0
    num_labels: int = 0
    shapes: Counter = field(default_factory=Counter)
    truncated_sources: list[str] = field(default_factory=list)  # first few, for the start-up message
    dropped_sources: list[str] = field(default_factory=list)

    def summary(self, name: str) -> str:
        shapes = ", ".join(f"{k}: {v}" for k, v in sorted(self.shapes.items()))
        text = (f"{name}: {self.num_examples} examples from {self.num_rows} rows in {len(self.files)} file(s) "
                f"({shapes}); {self.num_tokens:,} tokens, {self.num_labels:,} labelled; "
                f"truncated {self.num_truncated}, dropped {self.num_dropped} over-length")
        return text + affected_rows_text(self.truncated_sources, self.dropped_sources)


class SFTDataset:
    """Every row of the given files read, normalised and tokenised up front (bad rows fail at start-up)."""

    def __init__(self, examples: list[TokenizedSFT], report: SFTReport):
        self.examples = examples
        self.report = report

    def __len__(self):
        return len(self.examples)

    def lengths(self) -> np.ndarray:
        return np.array([len(e) for e in self.examples], dtype=np.int64)

    @classmethod
    def from_files(cls, files, tokenizer, settings: SFTTokenizeSettings, keys: SFTKeys = SFTKeys(),
                   name: str = "data") -> "SFTDataset":
        files = [str(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not files:
            raise DataError(f"{name}: no data files given (model.data.data_prefix)")
        report = SFTReport(files=files)
        examples = []
        for file in files:
            for line_no, row in read_rows(file):
                example = sft_example_from_row(row, f"{file}:{line_no}", keys)
                report.num_rows += 1
                report.shapes[example.shape] += 1
                tokenized = tokenize_sft(example, tokenizer, settings)
                if tokenized is None:
                    report.num_dropped += 1
                    note_source(report.dropped_sources, example.source)
                    continue
                if tokenized.truncated:
                    report.num_truncated += 1
                    note_source(report.truncated_sources, example.source)
                report.num_tokens += len(tokenized)
                report.num_labels += tokenized.num_labels
                examples.append(tokenized)
        report.num_examples = len(examples)
        if not examples:
            raise DataError(f"{name}: no usable examples in {files} ({report.num_dropped} dropped as over-length)")
        return cls(examples, report)


