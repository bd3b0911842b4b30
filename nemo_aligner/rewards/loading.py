"""Reward function specs (`model.grpo.reward_funcs`) to callables, with errors that name the key.

A spec is one of
    'path/to/file.py:function'    a Python file the user names, imported by its path
    'package.module:function'     an importable module (importlib)
    'accuracy_last_number'        a built-in (nemo_aligner/rewards/builtin.py)
    {fn: <one of the above>, name: <metric name>, kwargs: {...}}   the same, with parameters bound

Security: code runs only from a path or module the user wrote in the config. Nothing is ever looked up
beside a checkpoint, and `untrusted_dirs` (the recipe passes the checkpoint folders) refuses a file that
lies inside one of them even when named, since such a file came with downloaded weights.

Everything is checked here, at start-up, before any model is built: the file or module exists and
imports, the function exists and is callable, it accepts `completions=` (or **kwargs), its bound
kwargs are parameters it has, its required keyword-only parameters are given, and optional packages
it needs are installed.
"""

import functools
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from nemo_aligner.rewards.builtin import BUILTINS


@dataclass(frozen=True)
class RewardFunction:
    """A reward callable with the name its metrics use (`rewards/<name>/mean`) and where it came from."""

    name: str
    fn: Callable[..., Sequence]
    source: str  # the spec as the user wrote it, for messages


def load_reward_functions(specs: Iterable[Any], key: str = "model.grpo.reward_funcs",
                          untrusted_dirs: Sequence[str | Path] = ()) -> list[RewardFunction]:
    """Every spec loaded and checked; names must be unique (give `name:` to tell two apart)."""
    loaded = [load_reward_function(spec, f"{key}[{i}]", untrusted_dirs) for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for i, reward in enumerate(loaded):
        if reward.name in seen:
            raise ValueError(f"{key}[{i}] and {key}[{seen[reward.name]}] are both named {reward.name!r}; metrics "
                             f"need distinct names: use a mapping spec {{fn: {reward.source!r}, name: <another name>}}")
        seen[reward.name] = i
    return loaded


def load_reward_function(spec: Any, key: str = "model.grpo.reward_funcs[0]",
                         untrusted_dirs: Sequence[str | Path] = ()) -> RewardFunction:
    """One spec (string or mapping) -> a checked RewardFunction."""
    target, name, kwargs = _split_spec(spec, key)
    fn = _resolve(target, key, untrusted_dirs)
    _check_requirements(fn, key)
    _check_signature(fn, kwargs, key, target)
    bound = functools.partial(fn, **kwargs) if kwargs else fn
    return RewardFunction(name or getattr(fn, "__name__", target.rsplit(":", 1)[-1]), bound, target)


def _split_spec(spec: Any, key: str) -> tuple[str, Optional[str], dict]:
    if isinstance(spec, str) and spec.strip():
        return spec.strip(), None, {}
    if isinstance(spec, dict) and isinstance(spec.get("fn"), str) and not set(spec) - {"fn", "name", "kwargs"}:
        kwargs = spec.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ValueError(f"{key}.kwargs={kwargs!r}; expected a mapping of keyword arguments")
        return spec["fn"].strip(), spec.get("name"), dict(kwargs)
    raise ValueError(f"{key}={spec!r}; expected 'path/file.py:function', 'package.module:function', a built-in "
                     f"name ({sorted(BUILTINS)}) or a mapping {{fn: <spec>, name: <metric name>, kwargs: {{...}}}}")


def _resolve(target: str, key: str, untrusted_dirs) -> Callable:
    if ":" not in target:
        if target in BUILTINS:
            return BUILTINS[target]
        raise ValueError(f"{key}={target!r} is not a built-in reward ({sorted(BUILTINS)}); a user function is "
                         "'path/to/file.py:function' or 'package.module:function'")
    where, attr = target.rsplit(":", 1)
    if not where or not attr:
        raise ValueError(f"{key}={target!r}; expected 'path/to/file.py:function' or 'package.module:function'")
    is_file = where.endswith(".py") or "/" in where or "\\" in where
    module = _import_file(where, key, untrusted_dirs) if is_file else _import_module(where, key)
    if not hasattr(module, attr):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(f"{key}: {where} has no function {attr!r}; callables defined there: {found}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"{key}: {where}:{attr} is a {type(fn).__name__}, not a function")
    return fn


def _import_module(name: str, key: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise ValueError(f"{key}: no module named {name!r} (is it installed, or on PYTHONPATH? a file is "
                             f"written 'path/to/file.py:function')") from None
        raise ValueError(f"{key}: importing {name!r} failed: {_describe(err)}") from None
    except Exception as err:  # noqa: BLE001 - any error in the user's module is reported, not a traceback
        raise ValueError(f"{key}: importing {name!r} failed: {_describe(err)}") from None


def _import_file(where: str, key: str, untrusted_dirs):
    path = Path(where).expanduser()
    resolved = path.resolve()
    if not resolved.is_file():
        raise ValueError(f"{key}: reward file {where!r} does not exist (looked at {resolved})")
    if resolved.suffix != ".py":
        raise ValueError(f"{key}: reward file {where!r} is not a .py file")
    for folder in untrusted_dirs:
        folder = Path(folder).expanduser().resolve()
        if resolved == folder or folder in resolved.parents:
            raise ValueError(f"{key}: refusing to run {where!r}: it lies inside {folder}, a checkpoint folder; code "
                             "that comes with weights is never executed. Copy it elsewhere after reading it.")
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"nemo_aligner_user_reward_{resolved.stem}_{digest}"
    if module_name in sys.modules:  # two functions from one file: import it once
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed to import: one clear message
        del sys.modules[module_name]
        raise ValueError(f"{key}: importing {where} failed: {_describe(err)}") from None
    return module


def _describe(err: BaseException) -> str:
    """'TypeError: message (at file.py:12)' from the innermost frame of the error."""
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    if isinstance(err, SyntaxError) and err.filename:
        where = f" (at {Path(err.filename).name}:{err.lineno})"
    return f"{type(err).__name__}: {err}{where}"


def _check_requirements(fn: Callable, key: str) -> None:
    requires = getattr(fn, "requires", None)
    if requires and importlib.util.find_spec(requires[0]) is None:
        raise ValueError(f"{key}: {requires[1]}")


def _check_signature(fn: Callable, kwargs: dict, key: str, target: str) -> None:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: checked when called
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "completions" not in named and not takes_any:
        raise ValueError(f"{key}: {target} does not accept completions=...; reward functions are called as "
                         "fn(prompts=..., completions=..., completion_ids=..., **dataset_columns) -> list of floats "
                         "(add **kwargs to accept what it does not use)")
    # a built-in's **columns are dataset columns, never parameters: a misspelt parameter must not vanish there
    strict = not takes_any or fn in BUILTINS.values()
    reserved = sorted(set(kwargs) & {"prompts", "completions", "completion_ids"})
    if reserved:
        raise ValueError(f"{key}: kwargs {reserved} are passed by the trainer on every call; they cannot be bound")
    unknown = sorted(set(kwargs) - named) if strict else []
    if unknown:
        raise ValueError(f"{key}: {target} has no parameter(s) {unknown}; its parameters: {sorted(named)}")
    missing = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and p.default is p.empty
                     and n not in kwargs)
    if missing:
        raise ValueError(f"{key}: {target} needs {missing}; give them in a mapping spec: "
                         f"{{fn: {target}, kwargs: {{{', '.join(f'{m}: ...' for m in missing)}}}}}")
