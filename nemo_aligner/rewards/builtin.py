"""Built-in reward functions, called as TRL calls reward functions:
`fn(prompts=[...], completions=[...], completion_ids=[...], **dataset_columns) -> list[float | None]`.

Each is usable in `model.grpo.reward_funcs` by its bare name (`accuracy_last_number`) or as
`nemo_aligner.rewards:accuracy_last_number`; parameters go in a mapping spec,
`{fn: accuracy_regex, kwargs: {pattern: 'Answer: (.*)'}}`.

Accuracy rewards compare the completion's extracted final answer with the reference answer of the
row, from the column `answer_key` names (default: the first of `answer`, `solution`, `ground_truth`
present). They return 1.0 / 0.0, and None (not scored) for a row whose reference is None. A reference
written as GSM8K's `... #### 72` or with a `\\boxed{}` is reduced to that answer first. Answers that
both read as numbers are compared as numbers (`1,000` = `1000.0`), others as text with surrounding
space, `$` and a final `.` removed.

A completion is a string, or (conversational prompts) a list of messages whose last one is scored.
"""

import re
import threading
from typing import Any, Optional

REFERENCE_COLUMNS = ("answer", "solution", "ground_truth")
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
DEFAULT_ANSWER_PATTERN = r"<answer>(.*?)</answer>"
MATH_VERIFY_TIMEOUT_S = 5  # per parse / verify call (math-verify's default)
THINK_FORMAT_PATTERN = r"^<think>(?!.*<think>)(.*?)</think>.*$"  # TRL's think_format_reward


# ---------------------------------------------------------------------------------------------
# Extraction and comparison
# ---------------------------------------------------------------------------------------------


def completion_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the content of the last message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    raise ValueError(f"completion {completion!r:.80}: expected a string or a list of {{role, content}} messages")


def last_number(text: str) -> Optional[str]:
    """The last number in `text`, commas removed ('1,234.5'), or None."""
    matches = NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces matched, or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return None  # unbalanced: no answer


def last_regex_match(text: str, pattern: str) -> Optional[str]:
    """Group 1 (or the whole match, without groups) of the last match of `pattern`, or None."""
    matches = list(re.finditer(pattern, text, flags=re.DOTALL))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if last.re.groups else last.group(0)


def reference_answer(reference: Any) -> str:
    """A reference reduced to its final answer: after GSM8K's '####', else a \\boxed{} content, else itself."""
    text = str(reference)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = last_boxed(text)
    return boxed if boxed is not None else text.strip()


def _normalise(answer: str) -> str:
    return re.sub(r"\s+", " ", answer.strip().strip("$").strip().rstrip(".").strip())


def _as_number(answer: str) -> Optional[float]:
    text = _normalise(answer).replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def answers_match(predicted: Optional[str], reference: str) -> bool:
    """Numbers as numbers, everything else as normalised text."""
    if predicted is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return _normalise(predicted) == _normalise(reference)


def references(columns: dict, answer_key: Optional[str], fn_name: str) -> list:
    """The reference column of the batch, by name or the first of REFERENCE_COLUMNS present."""
    if answer_key is not None:
        if answer_key not in columns:
            raise ValueError(f"{fn_name}: answer_key={answer_key!r} is not a dataset column; columns: {sorted(columns)}")
        return columns[answer_key]
    for key in REFERENCE_COLUMNS:
        if key in columns:
            return columns[key]
    raise ValueError(f"{fn_name} needs the reference answer in a dataset column named one of {list(REFERENCE_COLUMNS)} "
                     f"(or set answer_key in its spec's kwargs); columns: {sorted(columns)}")


def _accuracy(completions, refs, extract) -> list[Optional[float]]:
    out = []
    for completion, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        out.append(1.0 if answers_match(extract(completion_text(completion)), reference_answer(ref)) else 0.0)
    return out


# ---------------------------------------------------------------------------------------------
# The built-ins
# ---------------------------------------------------------------------------------------------


def accuracy_last_number(prompts=None, completions=(), completion_ids=None, answer_key: Optional[str] = None,
                         **columns) -> list[Optional[float]]:
    """1.0 when the last number of the completion equals the reference answer (GSM8K style)."""
    return _accuracy(completions, references(columns, answer_key, "accuracy_last_number"), last_number)


def accuracy_boxed(prompts=None, completions=(), completion_ids=None, answer_key: Optional[str] = None,
                   **columns) -> list[Optional[float]]:
    """1.0 when the last \\boxed{} of the completion equals the reference answer (MATH style)."""
    return _accuracy(completions, references(columns, answer_key, "accuracy_boxed"), last_boxed)


def accuracy_regex(prompts=None, completions=(), completion_ids=None, pattern: str = DEFAULT_ANSWER_PATTERN,
                   answer_key: Optional[str] = None, **columns) -> list[Optional[float]]:
    """1.0 when group 1 of the last match of `pattern` (default `<answer>(.*?)</answer>`) equals the reference."""
    re.compile(pattern)
    return _accuracy(completions, references(columns, answer_key, "accuracy_regex"),
                     lambda text: last_regex_match(text, pattern))


def format_reward(prompts=None, completions=(), completion_ids=None, pattern: str = THINK_FORMAT_PATTERN,
                  **columns) -> list[float]:
    """1.0 when the whole completion matches `pattern` (re.match, DOTALL | MULTILINE; default TRL's think
    format: one <think>...</think> block first)."""
    regex = re.compile(pattern, flags=re.DOTALL | re.MULTILINE)
    return [1.0 if regex.match(completion_text(c)) else 0.0 for c in completions]


def length_penalty(prompts=None, completions=(), completion_ids=None, *, max_length: int, cache_length: int,
                   **columns) -> list[float]:
    """DAPO's soft overlong punishment on the completion's token count L (L_max = max_length, L_cache =
    cache_length): 0 up to L_max − L_cache, then falling linearly to −1 at L_max, −1 beyond."""
    if not 0 <= cache_length <= max_length:
        raise ValueError(f"length_penalty: expected 0 <= cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    if completion_ids is None:
        raise ValueError("length_penalty needs completion_ids (the completions' token ids)")
    free = max_length - cache_length
    out = []
    for ids in completion_ids:
        n = len(ids)
        out.append(0.0 if n <= free else (-1.0 if n > max_length else (free - n) / cache_length))
    return out


def math_equivalence(prompts=None, completions=(), completion_ids=None, answer_key: Optional[str] = None,
                     **columns) -> list[Optional[float]]:
    """1.0 when math-verify finds the completion's answer equivalent to the reference (e.g. \\frac{1}{2} = 0.5);
    None where the reference cannot be parsed. Needs the `math-verify` package."""
    try:
        from math_verify import parse, verify
    except ImportError as err:  # the loader checks first; this is for direct calls
        raise ValueError(MATH_VERIFY_MISSING) from err
    # math-verify's timeouts use signal.alarm, which works only in the main thread (as TRL, none elsewhere)
    timeout = MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    out = []
    for completion, ref in zip(completions, references(columns, answer_key, "math_equivalence")):
        gold = parse(str(ref), parsing_timeout=timeout) if ref is not None else []
        if not len(gold):
            out.append(None)
            continue
        answer = parse(completion_text(completion), parsing_timeout=timeout)
        out.append(float(verify(gold, answer, timeout_seconds=timeout)))
    return out


# antlr4 pinned: math-verify alone pulls antlr4 4.13, which breaks Hydra/OmegaConf (built for 4.9)
MATH_VERIFY_MISSING = ("math_equivalence needs the math-verify package, which is not installed: "
                       "pip install 'nemo_aligner[math]' (or pip install math-verify antlr4-python3-runtime==4.9.3; "
                       "a newer antlr4 breaks Hydra's config parser)")
math_equivalence.requires = ("math_verify", MATH_VERIFY_MISSING)

BUILTINS = {fn.__name__: fn for fn in (accuracy_last_number, accuracy_boxed, accuracy_regex, format_reward,
                                       length_penalty, math_equivalence)}
