"""Reward functions: the built-ins, loading specs (files, modules, built-in names, mapping specs) with
clear errors, and RewardFunctions (weights, None, per-function metrics, errors naming the function and
the first bad sample)."""

import importlib.util
import math

import pytest
import torch

from nemo_aligner.losses import group_advantages
from nemo_aligner.rewards import (
    BUILTINS,
    RewardError,
    RewardFunction,
    RewardFunctions,
    accuracy_boxed,
    accuracy_last_number,
    accuracy_regex,
    format_reward,
    length_penalty,
    load_reward_function,
    load_reward_functions,
    math_equivalence,
)

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


# ---------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------


def test_accuracy_last_number_reads_gsm8k_references_and_formats_numbers():
    completions = ["so 3 + 4 = 7", "The total is $1,000.", "-2.50 is it", "no number here", "12 then 13"]
    answers = ["#### 7", "1000", "-2.5", "#### 4", "12"]
    assert accuracy_last_number(completions=completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert accuracy_last_number(completions=["7"], solution=[None]) == [None]  # no reference: not scored
    assert accuracy_last_number(completions=["7"], gold=["7"], answer_key="gold") == [1.0]


def test_accuracy_boxed_matches_braces_and_reduces_boxed_references():
    completions = [r"so \boxed{\frac{1}{2}}", r"\boxed{3} then \boxed{4}", r"\boxed{x", "plain 5"]
    answers = [r"\frac{1}{2}", r"the answer is $\boxed{4}$", "x", "5"]
    assert accuracy_boxed(completions=completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]


def test_accuracy_regex_and_format_reward_and_conversational_completions():
    assert accuracy_regex(completions=["<answer> 42 </answer>", "<answer>41</answer>"], answer=["42", "42"]) == [1.0, 0.0]
    assert accuracy_regex(completions=["Answer: yes."], answer=["yes"], pattern=r"Answer: (\w+)") == [1.0]
    messages = [[{"role": "assistant", "content": "<think>hm</think> 3"}], [{"role": "assistant", "content": "3"}]]
    assert format_reward(completions=messages) == [1.0, 0.0]
    assert format_reward(completions=["<think>a</think><think>b</think>"]) == [0.0]  # TRL: one block only
    assert accuracy_last_number(completions=messages, answer=["3", "3"]) == [1.0, 1.0]


def test_length_penalty_is_dapos_soft_overlong_punishment():
    ids = [[1] * n for n in (50, 80, 90, 100, 101)]
    assert length_penalty(completion_ids=ids, max_length=100, cache_length=20) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="expected 0 <= cache_length <= max_length"):
        length_penalty(completion_ids=ids, max_length=10, cache_length=20)


def test_accuracy_needs_a_reference_column_and_says_which():
    with pytest.raises(ValueError, match=r"accuracy_boxed needs the reference answer in a dataset column named one of "
                                         r"\['answer', 'solution', 'ground_truth'\].*columns: \['question'\]"):
        accuracy_boxed(completions=["1"], question=["q"])


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is not installed (optional extra: pip install 'nemo_aligner[math]')")
def test_math_equivalence_uses_math_verify():
    completions = [r"The answer is $\boxed{\frac{1}{2}}$", r"The answer is $\boxed{0.5}$", r"$\boxed{3}$"]
    assert math_equivalence(completions=completions, answer=[r"$\frac{1}{2}$", r"$\frac{1}{2}$", "$4$"]) == [1.0, 1.0, 0.0]
    fn = load_reward_function("math_equivalence")
    assert fn.name == "math_equivalence"


def test_math_equivalence_without_math_verify_fails_at_load_with_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    with pytest.raises(ValueError, match=r"model.grpo.reward_funcs\[0\]: math_equivalence needs the math-verify "
                                         r"package, which is not installed: pip install 'nemo_aligner\[math\]'"):
        load_reward_function("nemo_aligner.rewards:math_equivalence")


# ---------------------------------------------------------------------------------------------
# Loading specs
# ---------------------------------------------------------------------------------------------

USER_FILE = '''
def right_length(prompts, completions, completion_ids, target=3, **kwargs):
    return [1.0 if len(ids) == target else 0.0 for ids in completion_ids]

def strict(completions, level):
    return [float(level)] * len(completions)

def no_completions(texts):
    return []

THRESHOLD = 0.5
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_FILE)
    return path


def test_specs_load_files_modules_builtins_and_mappings(user_file):
    funcs = load_reward_functions([f"{user_file}:right_length", "nemo_aligner.rewards:accuracy_last_number",
                                   "format_reward", {"fn": f"{user_file}:right_length", "name": "len5",
                                                     "kwargs": {"target": 5}}])
    assert [f.name for f in funcs] == ["right_length", "accuracy_last_number", "format_reward", "len5"]
    assert funcs[1].fn is BUILTINS["accuracy_last_number"] and funcs[2].fn is format_reward
    ids = [[1] * 3, [1] * 5]
    assert funcs[0].fn(prompts=["a", "b"], completions=["x", "y"], completion_ids=ids) == [1.0, 0.0]
    assert funcs[3].fn(prompts=["a", "b"], completions=["x", "y"], completion_ids=ids) == [0.0, 1.0]


@pytest.mark.parametrize("spec,message", [
    ("missing_file.py:f", r"reward file 'missing_file.py' does not exist \(looked at .*missing_file.py\)"),
    ("{file}:nope", r"has no function 'nope'; callables defined there: \['no_completions', 'right_length', 'strict'\]"),
    ("{file}:THRESHOLD", r"my_rewards.py:THRESHOLD is a float, not a function"),
    ("{file}:no_completions", r"does not accept completions=...; reward functions are called as"),
    ("not_a_builtin", r"'not_a_builtin' is not a built-in reward \(\['accuracy_boxed', .*\]\)"),
    ("no_such_pkg.mod:f", r"no module named 'no_such_pkg.mod' \(is it installed, or on PYTHONPATH"),
    ({"fn": "accuracy_regex", "kwargs": {"patern": "x"}}, r"accuracy_regex has no parameter\(s\) \['patern'\]"),
    ({"fn": "length_penalty"}, r"length_penalty needs \['cache_length', 'max_length'\]; give them in a mapping spec"),
    ({"fn": "format_reward", "kwargs": {"completions": []}}, r"kwargs \['completions'\] are passed by the trainer"),
    ({"func": "format_reward"}, r"expected 'path/file.py:function', 'package.module:function', a built-in name"),
])
def test_bad_specs_say_what_is_wrong_naming_the_key(user_file, spec, message):
    spec = spec.replace("{file}", str(user_file)) if isinstance(spec, str) else spec
    with pytest.raises(ValueError, match=r"model.grpo.reward_funcs\[0\]"):
        load_reward_function(spec)
    with pytest.raises(ValueError, match=message):
        load_reward_function(spec)


def test_a_user_file_that_fails_to_import_is_reported_with_file_and_line(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\ndef f(completions, **kw):\n    return [0.0] * len(completions)\nraise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match=r"importing .*broken.py failed: RuntimeError: boom \(at broken.py:4\)"):
        load_reward_function(f"{broken}:f")
    bad_syntax = tmp_path / "syntax.py"
    bad_syntax.write_text("def f(:\n")
    with pytest.raises(ValueError, match=r"importing .*syntax.py failed: SyntaxError: .* \(at syntax.py:1\)"):
        load_reward_function(f"{bad_syntax}:f")


def test_files_inside_a_checkpoint_folder_are_never_executed(tmp_path):
    ckpt = tmp_path / "downloaded_model"
    ckpt.mkdir()
    marker = tmp_path / "ran"
    (ckpt / "reward.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef f(completions, **kw):\n    return []\n")
    with pytest.raises(ValueError, match=r"refusing to run .*reward.py.*: it lies inside .*downloaded_model, a "
                                         r"checkpoint folder"):
        load_reward_function(f"{ckpt / 'reward.py'}:f", untrusted_dirs=[ckpt])
    assert not marker.exists()


def test_duplicate_names_need_a_name(user_file):
    with pytest.raises(ValueError, match=r"model.grpo.reward_funcs\[1\] and model.grpo.reward_funcs\[0\] are both "
                                         r"named 'format_reward'.*name: <another name>"):
        load_reward_functions(["format_reward", "nemo_aligner.rewards:format_reward"])


# ---------------------------------------------------------------------------------------------
# RewardFunctions
# ---------------------------------------------------------------------------------------------


def _fn(name, body):
    return RewardFunction(name, body, f"test:{name}")


PROMPTS = ["p0", "p1", "p2", "p3"]
COMPLETIONS = ["c0", "c1", "c2", "c3"]
IDS = [[1], [1, 2], [1, 2, 3], [4]]


def test_weights_none_and_metrics_follow_trl():
    a = _fn("a", lambda completions, **kw: [1.0, None, 0.0, None])
    b = _fn("b", lambda completions, **kw: [2.0, 4.0, None, None])
    scores = RewardFunctions([a, b], [0.5, 2.0])(PROMPTS, COMPLETIONS, IDS)
    assert scores.names == ["a", "b"]
    assert torch.isnan(scores.per_function_BF[1, 0]) and torch.isnan(scores.per_function_BF[2, 1])
    r = scores.rewards_B.tolist()
    assert r[:3] == [0.5 + 4.0, 8.0, 0.0] and math.isnan(r[3])  # nobody scored sample 3
    m = scores.metrics()
    assert m["rewards/a/mean"] == 0.5 and m["rewards/b/mean"] == 3.0
    assert m["rewards/a/std"] == pytest.approx(math.sqrt(0.5)) and m["rewards/b/std"] == pytest.approx(math.sqrt(2.0))
    adv = group_advantages(scores.rewards_B, 4)  # the unscored sample is left out and gets 0
    assert adv[3] == 0 and not torch.isnan(adv).any()


def test_columns_are_passed_as_keyword_lists():
    seen = {}

    def spy(prompts, completions, completion_ids, **columns):
        seen.update(prompts=prompts, completion_ids=completion_ids, **columns)
        return [0.0] * len(completions)

    RewardFunctions([_fn("spy", spy)])(PROMPTS, COMPLETIONS, IDS, {"answer": ["1", "2", "3", "4"]})
    assert seen == {"prompts": PROMPTS, "completion_ids": IDS, "answer": ["1", "2", "3", "4"]}


def test_a_raising_function_is_named_with_the_first_sample_that_fails():
    def picky(prompts, completions, **kw):
        return [1.0 / (len(c) - 2) for c in completions]  # "c2" ... all length 2: every sample fails

    def fails_on_p2(prompts, completions, **kw):
        if "p2" in prompts:
            raise KeyError("no answer for p2")
        return [0.0] * len(prompts)

    with pytest.raises(RewardError, match=r"reward function 'picky' \(test:picky\) raised ZeroDivisionError: .* on "
                                          r"sample 0: prompt 'p0', completion 'c0'"):
        RewardFunctions([_fn("picky", picky)])(PROMPTS, COMPLETIONS, IDS)
    with pytest.raises(RewardError, match=r"'fails_on_p2' .* raised KeyError: 'no answer for p2' \(at test_rewards.py:\d+\) "
                                          r"on sample 2: prompt 'p2', completion 'c2'"):
        RewardFunctions([_fn("fails_on_p2", fails_on_p2)])(PROMPTS, COMPLETIONS, IDS)

    def batch_only(prompts, completions, **kw):
        if len(prompts) > 1:
            raise MemoryError("too many at once")
        return [0.0]

    with pytest.raises(RewardError, match=r"raised MemoryError: too many at once .* on the batch of 4 samples \(each "
                                          r"sample alone succeeds\)"):
        RewardFunctions([_fn("batch_only", batch_only)])(PROMPTS, COMPLETIONS, IDS)


@pytest.mark.parametrize("returned,message", [
    ([1.0, 2.0, 3.0], r"'bad' \(test:bad\) returned 3 rewards for 4 completions \(one per completion\); the first "
                      r"completion without a reward is sample 3: prompt 'p3', completion 'c3'"),
    ([1.0] * 6, r"returned 6 rewards for 4 completions \(one per completion\); 2 more than there are completions"),
    ([1.0, float("nan"), 0.0, 0.0], r"returned nan for sample 1 \(use None for 'not scored'\): prompt 'p1'"),
    ([1.0, 0.0, float("inf"), 0.0], r"returned inf for sample 2"),
    ([1.0, "0.5", 0.0, 0.0], r"returned '0.5' \(str\) for sample 1; expected a float or None: prompt 'p1'"),
    (0.5, r"returned float; expected a list of 4 floats or None \(one per completion\)"),
    (torch.tensor(1.0), r"returned Tensor; expected a list of 4 floats or None"),
    ({"a": 1.0}, r"returned dict; expected a list of 4 floats or None"),
])
def test_bad_returns_stop_with_the_function_and_the_sample(returned, message):
    with pytest.raises(RewardError, match=message):
        RewardFunctions([_fn("bad", lambda completions, **kw: returned)])(PROMPTS, COMPLETIONS, IDS)


def test_numpy_and_tensor_returns_are_accepted():
    numpyish = _fn("t", lambda completions, **kw: torch.tensor([1.0, 0.0, 0.5, 1.0]))
    flags = _fn("f", lambda completions, **kw: [True, False, True, False])
    scores = RewardFunctions([numpyish, flags])(PROMPTS, COMPLETIONS, IDS)
    assert scores.rewards_B.tolist() == [2.0, 0.0, 1.5, 1.0]


def test_combiner_configuration_errors(user_file):
    with pytest.raises(ValueError, match=r"model.grpo.reward_funcs is empty and there is no reward model"):
        RewardFunctions([])
    with pytest.raises(ValueError, match=r"model.grpo.reward_weights has 1 entries, expected 2 \(one per reward: "
                                         r"\['format_reward', 'rm'\]\)"):
        RewardFunctions.from_specs(["format_reward"], [1.0], extra=[_fn("rm", lambda completions, **kw: [])])
    with pytest.raises(ValueError, match="expected finite numbers"):
        RewardFunctions([_fn("a", None)], [float("nan")])
    with pytest.raises(ValueError, match=r"dataset column\(s\) \['completions'\] clash with the arguments"):
        RewardFunctions([_fn("a", lambda completions, **kw: [0.0] * 4)])(PROMPTS, COMPLETIONS, IDS,
                                                                          {"completions": COMPLETIONS})
    with pytest.raises(ValueError, match="answer has 1 entries for 4 completions"):
        RewardFunctions([_fn("a", lambda completions, **kw: [0.0] * 4)])(PROMPTS, COMPLETIONS, IDS, {"answer": ["x"]})


def test_from_specs_end_to_end(user_file):
    rf = RewardFunctions.from_specs([f"{user_file}:right_length", "accuracy_last_number"], [1.0, 2.0])
    scores = rf(PROMPTS, ["1", "2", "3", "4"], IDS, {"answer": ["1", "0", "3", None]})
    assert scores.per_function_BF[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert scores.rewards_B.tolist() == [2.0, 0.0, 3.0, 0.0]  # sample 3: accuracy unscored, length scored 0
