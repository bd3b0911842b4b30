"""Render an SFTExample and tokenise it with an exact label mask; apply the over-length policy.

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

from dataclasses import dataclass

import numpy as np

from nemo_aligner.data.chat_templates import render_with_assistant_spans
from nemo_aligner.data.dataset import TokenizeSettings, with_bos
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.sft.rows import SFTExample


@dataclass
class SFTTokenizeSettings(TokenizeSettings):
    loss_on: str = "all_assistant"  # all_assistant | last_assistant: which assistant turns carry labels


@dataclass
class TokenizedSFT:
    ids: np.ndarray  # int32 [L]
    label_mask: np.ndarray  # bool [L]: token i is a target (predicted from position i - 1)
    truncated: bool = False

    def __len__(self):
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
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
    ids, prepended = with_bos(ids, tokenizer, settings.add_bos)
    mask = [False] * prepended + mask
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
