"""Turn a PreferenceExample into token ids with an exact prompt/response boundary, and apply the
over-length policy.

The prompt and each response are tokenised separately and concatenated, so the boundary is exact
even where a tokenizer would merge characters across it. A string prompt is used verbatim; a
message prompt goes through the chat template with a generation prompt, and a message response is
the text the template adds after that prompt (its end-of-turn marker included).
"""

from dataclasses import dataclass

import numpy as np

from nemo_aligner.data.batch import PrefixGroup
from nemo_aligner.data.dataset import TokenizeSettings, with_bos, with_eos
from nemo_aligner.data.rows import DataError
from nemo_aligner.data.preference.rows import PreferenceExample


@dataclass
class TokenizedPair:
    prompt: np.ndarray  # int32 token ids shared by both sequences
    chosen: np.ndarray  # response ids
    rejected: np.ndarray
    chosen_reward: float | None
    rejected_reward: float | None
    truncated: bool = False
    margin: float | None = None  # reward models' per-pair margin (PreferenceExample.margin)

    @property
    def num_tokens(self) -> int:
        """Tokens of both sequences together (what a pack holds for this pair)."""
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)

    @property
    def num_labels(self) -> int:
        return len(self.chosen) + len(self.rejected)

    @property
    def num_shared_tokens(self) -> int:
        """Tokens of the pair laid out with a shared prompt (`prefix_group`): the prompt once, plus one."""
        return len(self.prompt) + 1 + len(self.chosen) + len(self.rejected)

    def prefix_group(self) -> PrefixGroup:
        """The pair as one prefix group: prompt[:-1] shared, then per response the last prompt token and
        the response. The last prompt token is repeated because its position predicts each response's first
        token, a different target per branch; every other prompt position has no target, so sharing it
        computes exactly what the two separate sequences compute."""
        shared, last = self.prompt[:-1], self.prompt[-1:]
        branches = []
        for response in (self.chosen, self.rejected):
            mask = np.ones(1 + len(response), dtype=bool)
            mask[0] = False
            branches.append((np.concatenate([last, response]), mask))
        return PrefixGroup(shared, branches)

    def sequences(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids, label mask) of the chosen and the rejected sequence: labels on the response only."""
        out = []
        for response in (self.chosen, self.rejected):
            mask = np.zeros(len(self.prompt) + len(response), dtype=bool)
            mask[len(self.prompt):] = True
            out.append((np.concatenate([self.prompt, response]), mask))
        return out


def render(example: PreferenceExample, tokenizer, template: str | None) -> tuple[str, str, str]:
    """(prompt text, chosen text, rejected text) before tokenisation."""
    if isinstance(example.prompt, str):
        for what in ("chosen", "rejected"):
            if not isinstance(getattr(example, what), str):
                raise DataError(f"{example.source}: prompt is a string but {what} is a list of messages; "
                                "give both as strings or both as messages")
        return example.prompt, example.chosen, example.rejected
    prompt_text = tokenizer.apply_chat_template(example.prompt, add_generation_prompt=True, template=template)
    responses = []
    for what in ("chosen", "rejected"):
        response = getattr(example, what)
        if isinstance(response, str):  # TRL allows a string completion after a conversational prompt
            response = [{"role": "assistant", "content": response}]
        full = tokenizer.apply_chat_template(example.prompt + response, template=template)
        if not full.startswith(prompt_text):
            raise DataError(f"{example.source}: the chat template renders prompt + {what} without the prompt as a "
                            "prefix; choose another model.data.chat_template")
        responses.append(full[len(prompt_text):])
    return prompt_text, *responses


def tokenize_pair(example: PreferenceExample, tokenizer, settings: TokenizeSettings,
                  require_prompt: bool = True) -> TokenizedPair | None:
    """Token ids for one pair; None when the over-length policy drops it. require_prompt=False: an empty
    prompt is fine (a reward model scores whole sequences; no response token needs one before it)."""
    prompt_text, chosen_text, rejected_text = render(example, tokenizer, settings.chat_template)
    prompt, _ = with_bos(tokenizer.encode(prompt_text), tokenizer, settings.add_bos)
    chosen, rejected = tokenizer.encode(chosen_text), tokenizer.encode(rejected_text)
    if settings.add_eos and isinstance(example.chosen, str) and tokenizer.eos_id is not None:
        chosen, rejected = with_eos(chosen, tokenizer.eos_id), with_eos(rejected, tokenizer.eos_id)
    if not prompt and require_prompt:
        raise DataError(f"{example.source}: the prompt has no tokens; a response needs at least one token before it")
    pair = TokenizedPair(np.asarray(prompt, np.int32), np.asarray(chosen, np.int32), np.asarray(rejected, np.int32),
                         example.chosen_reward, example.rejected_reward, margin=example.margin)
    return apply_overlength(pair, settings, example.source)


def apply_overlength(pair: TokenizedPair, settings: TokenizeSettings, source: str) -> TokenizedPair | None:
    limit = settings.seq_length
    p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
    longest = p + max(c, r)
    if longest <= limit:
        return pair
    if settings.overlength == "error":
        raise DataError(f"{source}: pair has {longest} tokens (prompt {p} + longest response {max(c, r)}) > "
                        f"seq_length={limit}; shorten it or set model.data.overlength=truncate|drop")
    if settings.overlength == "drop":
        return None
    # truncate: keep the responses whole if possible, cutting the prompt from the left (its end, next to
    # the response, matters most); keep at least one prompt token (if there is one) so the first response
    # token is scored.
    keep_prompt = max(min(p, 1), limit - max(c, r))
    keep_response = limit - keep_prompt
    return TokenizedPair(pair.prompt[p - keep_prompt:], pair.chosen[:keep_response], pair.rejected[:keep_response],
                         pair.chosen_reward, pair.rejected_reward, truncated=True, margin=pair.margin)
