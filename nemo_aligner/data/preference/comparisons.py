"""The reward-model row formats, normalised into PreferenceExample like every other preference shape
(`data.preference.rows`), so everything after parsing is shared.

NeMo-Aligner comparison files (its `train_reward_model.py` data): one JSON object per line,
`{"text": prompt + chosen}` then `{"text": prompt + rejected}`, pairs on consecutive lines. A file is
one when its first row has `text` and no chosen / rejected key; every line must then have `text`, and
an odd line count is an error naming the file and the line left without a partner. Each pair becomes
the chosen and rejected "responses" of an empty prompt, each text tokenised whole, as NeMo-Aligner
does (a score needs no prompt / response boundary). Its source reads `file:3-4` (both lines).

NeMo-RL: `{"context": [messages], "completions": [{"rank": 0, "completion": [messages]},
{"rank": 1, "completion": [messages]}]}`, the lower rank preferred; exactly two completions with
different ranks (a ranking of more is not silently cut to a pair).

Any other row goes through `preference_from_row` (every DPO shape). A per-pair margin (Llama 2, TRL's
`margin` column) is read from `margin_key` on any row that has it.
"""

import itertools
from typing import Iterator

from nemo_aligner.data.preference.rows import (
    CHOSEN_KEYS, REJECTED_KEYS, PreferenceColumns, PreferenceExample, _check_prompt, _check_response, _reward,
    preference_from_row,
)
from nemo_aligner.data.rows import DataError, read_rows
from nemo_aligner.data.sources import span

TEXT = "text"
COMPARISON = "__comparison__"  # the merged row of one comparison pair: (chosen text, rejected text, "file:3-4")


def is_comparison_row(row: dict) -> bool:
    return TEXT in row and not any(key in row for key in CHOSEN_KEYS + REJECTED_KEYS)


def read_reward_rows(path, key: str = "model.data.data_prefix") -> Iterator[tuple[str, dict]]:
    """(location, row) of a preference file; a comparison file yields one merged row per pair of lines."""
    rows = read_rows(path, key)
    first = next(rows, None)
    if first is None:
        return
    rows = itertools.chain([first], rows)
    if is_comparison_row(first[1]):
        yield from _comparison_pairs(path, rows)
    else:
        yield from rows


def _comparison_pairs(path, rows) -> Iterator[tuple[str, dict]]:
    pending, count = None, 0
    for where, row in rows:
        count += 1
        text = row.get(TEXT)
        if TEXT not in row:
            raise DataError(f"{where}: missing key 'text'; a comparison file (its first line has 'text') "
                            f"holds {{\"text\": prompt + response}} on every line; row has {sorted(row)}")
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if pending is None:
            pending = (where, text)
            continue
        yield pending[0], {COMPARISON: (pending[1], text, span(pending[0], where))}
        pending = None
    if pending is not None:
        last = _line_or_row(pending[0])
        raise DataError(f"{path}: {count} {last.split()[0]}s, an odd number, in a comparison file (a chosen line then "
                        f"its rejected line per pair): {last} has no rejected partner")


def _line_or_row(where: str) -> str:
    """"line 3" of "a.jsonl:3", "row 3" of "a.parquet:row 3"."""
    number = where.rpartition(":")[2]
    return number if number.startswith("row") else f"line {number}"


def reward_example(row: dict, where: str, columns: PreferenceColumns = PreferenceColumns(),
                   margin_key: str | None = "margin") -> PreferenceExample:
    """Any accepted row (or merged comparison pair) -> PreferenceExample, with its margin when it has one."""
    if COMPARISON in row:
        return _comparison_example(*row[COMPARISON])
    if "context" in row and "completions" in row:
        example = nemo_rl_example(row, where)
    else:
        example = preference_from_row(row, where, columns)
    if margin_key is not None:
        example.margin = _reward(row, margin_key, where)
    return example


def _comparison_example(chosen: str, rejected: str, source: str) -> PreferenceExample:
    return PreferenceExample(prompt="", chosen=_check_response(chosen, "chosen", source),
                             rejected=_check_response(rejected, "rejected", source), shape="nemo_comparison",
                             source=source)


def nemo_rl_example(row: dict, where: str) -> PreferenceExample:
    completions = row["completions"]
    if not isinstance(completions, list) or len(completions) != 2:
        n = len(completions) if isinstance(completions, list) else type(completions).__name__
        raise DataError(f"{where}: 'completions' holds {n} entries; pairs are supported: exactly two completions, "
                        "ranked 0 (preferred) and 1")
    ranks = []
    for k, item in enumerate(completions):
        if not isinstance(item, dict) or "rank" not in item or "completion" not in item:
            raise DataError(f"{where}: completions[{k}] must be an object with 'rank' and 'completion'")
        if isinstance(item["rank"], bool) or not isinstance(item["rank"], int):
            raise DataError(f"{where}: completions[{k}].rank must be an integer, got {item['rank']!r}")
        ranks.append(item["rank"])
    if ranks[0] == ranks[1]:
        raise DataError(f"{where}: both completions have rank {ranks[0]}; the lower rank is the preferred one, so "
                        "they must differ")
    best, worst = sorted(completions, key=lambda item: item["rank"])
    return PreferenceExample(prompt=_check_prompt(row["context"], where),
                             chosen=_check_response(best["completion"], "chosen", where),
                             rejected=_check_response(worst["completion"], "rejected", where),
                             shape="nemo_rl", source=where)


__all__ = ["read_reward_rows", "reward_example", "nemo_rl_example", "is_comparison_row"]
