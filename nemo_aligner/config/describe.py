"""Every key of a run config with its type, default and one-line description, read from the schema
itself (the comment on each field's line, or the comment lines right above it), for `--help`.

    for key in describe(DPORunConfig): print(key.name, key.default, key.doc)
    print(help_text(DPORunConfig, "nemo-aligner dpo"))

Nothing here imports torch.
"""

import dataclasses
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class KeyDoc:
    name: str  # dotted key, e.g. model.dpo.ref_policy_kl_penalty
    type: str
    default: object
    doc: str


@lru_cache(maxsize=None)
def field_comments(cls) -> dict[str, str]:
    """field name -> its comment, for the fields `cls` itself declares (inherited ones: their class)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, above, line_comment = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line_comment[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(line_comment.get(number, ""))
            continue
        name = _field_name(stripped)
        if name is not None:
            doc = line_comment.get(number) if not stripped.startswith("#") and "#" in line else None
            comments[name] = doc or " ".join(above)
        above = [] if not stripped.startswith("#") else above
    return {k: v for k, v in comments.items() if v}


def _field_name(stripped: str) -> str | None:
    """`name: type = default` at class level -> name."""
    head, colon, _ = stripped.partition(":")
    if not colon or not head.isidentifier() or stripped.startswith(("def ", "class ", "return", "@")):
        return None
    return head


def _doc_for(cls, name: str) -> str:
    for klass in cls.__mro__:  # the most derived class that documents the field
        if dataclasses.is_dataclass(klass) and name in field_comments(klass):
            return field_comments(klass)[name]
    return ""


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _type_name(annotation) -> str:
    if isinstance(annotation, str):
        return annotation
    if getattr(annotation, "__origin__", None) is typing.Union:
        args = [a for a in annotation.__args__ if a is not type(None)]
        return f"{_type_name(args[0])} | null" if len(args) == 1 else " | ".join(map(_type_name, args))
    return getattr(annotation, "__name__", str(annotation))


def describe(schema, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of `schema` (a dataclass type or instance), depth first, in declaration order."""
    instance = schema() if isinstance(schema, type) else schema
    hints = typing.get_type_hints(type(instance))
    out = []
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            out.extend(describe(value, prefix=name + "."))
        else:
            out.append(KeyDoc(name, _type_name(hints.get(field.name, field.type)), _default(field),
                              _doc_for(type(instance), field.name)))
    return out


TOP_LEVEL_ORDER = ("name", "trainer", "exp_manager", "pretrained_checkpoint", "model")


def _sections(keys: list[KeyDoc]) -> dict[str, list[KeyDoc]]:
    """Keys grouped by their parent (`model.optim.sched`, ...), top-level sections in TOP_LEVEL_ORDER."""
    groups: dict[str, list[KeyDoc]] = {}
    for key in keys:
        groups.setdefault(key.name.rsplit(".", 1)[0] if "." in key.name else "", []).append(key)

    def rank(parent: str):
        if not parent:
            return -1
        top = parent.split(".")[0]
        return TOP_LEVEL_ORDER.index(top) if top in TOP_LEVEL_ORDER else len(TOP_LEVEL_ORDER)

    return dict(sorted(groups.items(), key=lambda item: rank(item[0])))  # stable: declaration order within


def _show(value) -> str:
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def help_text(schema, command: str) -> str:
    """What `<command> --help` prints: usage, then every key by section: name = default, and what it does."""
    lines = [f"usage: {command} [key=value ...]",
             "Hydra overrides with NeMo-Aligner's key names (key=value, ++key=value, \"key={a: [1, 2]}\").",
             "Every key, its default and what it does:"]
    for parent, keys in _sections(describe(schema)).items():
        lines.append(f"\n[{parent or 'run'}]")
        for key in keys:
            lines.append(f"  {key.name} = {_show(key.default)}" + (f"\n      {key.doc}" if key.doc else ""))
    return "\n".join(lines)
